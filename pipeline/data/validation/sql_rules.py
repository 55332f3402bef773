"""The row rules of `rules.checks` as SQL, for the DuckDB and Spark engines: derived, never restated.

Each row rule is still one GX expectation (`rules.checks`); this module reads the expectation's
own kwargs (column, min_value, max_value, strict_min/strict_max, column_list, ignore_row_if)
and writes the SQL predicate that is true where GX's pandas engine reports the row as
unexpected. An expectation type or kwarg not handled here stops the stage (`UnsupportedRule`)
rather than be skipped, so a new rule cannot silently go unchecked at scale.

Semantics kept from GX on pandas: a NaN float counts as null (not-null fails, a between check
skips it); a between check judges non-null values only; the compound uniqueness check ignores
rows with any key missing and lists every member of a repeated key.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline.data.sql_engine import Dialect

from .rules import DUPLICATE, REASONS, Check


class UnsupportedRule(RuntimeError):
    """A row rule whose expectation has no SQL form here: add one rather than skip the rule."""


def quote(column: str) -> str:
    return '"' + column.replace('"', '""') + '"'


def _literal(value: Any, dialect: Dialect) -> str:
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise UnsupportedRule(f"naive datetime bound {value!r}: bounds must be instants")
        return f"{dialect.instant_type} '{value.astimezone(dt.UTC).isoformat()}'"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UnsupportedRule(f"bound {value!r} of type {type(value).__name__} has no SQL form here")
    return repr(float(value))


def _is_missing(column: str, arrow_type: pa.DataType) -> str:
    """Null as GX on pandas sees it: a NaN float is null too."""
    if pa.types.is_floating(arrow_type):
        return f"({quote(column)} IS NULL OR isnan({quote(column)}))"
    return f"({quote(column)} IS NULL)"


def _value(column: str, arrow_type: pa.DataType) -> str:
    # Floats are compared as DOUBLE, as GX compares the float64 frame `frame.gx_frame` gives it.
    return f"{quote(column)}::DOUBLE" if pa.types.is_floating(arrow_type) else quote(column)


@dataclass(frozen=True)
class KeyRule:
    """The uniqueness rule: rows whose `columns` are all present and repeat (every member of a repeat)."""

    check: Check
    columns: tuple[str, ...]

    def complete(self, types: dict[str, pa.DataType]) -> str:
        return " AND ".join(f"NOT {_is_missing(c, types[c])}" for c in self.columns)


def _options(expectation: Any, allowed: set[str]) -> None:
    if getattr(expectation, "mostly", 1) != 1:
        raise UnsupportedRule(f"{type(expectation).__name__}: mostly={expectation.mostly}; row routing needs mostly=1")
    if getattr(expectation, "row_condition", None) is not None and "row_condition" not in allowed:
        raise UnsupportedRule(f"{type(expectation).__name__}: a row_condition has no SQL form here")


def predicate(check: Check, types: dict[str, pa.DataType], dialect: Dialect) -> str:
    """SQL true exactly where GX reports the row as breaking `check` (a row rule, not uniqueness)."""
    expectation = check.expectation
    kind = type(expectation).__name__
    _options(expectation, set())
    if kind == "ExpectColumnValuesToNotBeNull":
        return _is_missing(expectation.column, types[expectation.column])
    if kind == "ExpectColumnValuesToBeBetween":
        column = expectation.column
        value = _value(column, types[column])
        within = []
        if expectation.min_value is not None:
            within.append(f"{value} {'>' if expectation.strict_min else '>='} {_literal(expectation.min_value, dialect)}")
        if expectation.max_value is not None:
            within.append(f"{value} {'<' if expectation.strict_max else '<='} {_literal(expectation.max_value, dialect)}")
        if not within:
            raise UnsupportedRule(f"{check.name}: a between check without bounds")
        return f"(NOT {_is_missing(column, types[column])} AND NOT ({' AND '.join(within)}))"
    raise UnsupportedRule(f"{check.name}: no SQL form for {kind}")


def row_count_within(expectation: Any, rows: int) -> bool:
    """ExpectTableRowCountToBeBetween's verdict on `rows`, from its own bounds (GX saw only a sample)."""
    low, high = expectation.min_value, expectation.max_value
    return (low is None or rows >= low) and (high is None or rows <= high)


def key_rule(check: Check) -> KeyRule:
    expectation = check.expectation
    kind = type(expectation).__name__
    if kind != "ExpectCompoundColumnsToBeUnique" or expectation.ignore_row_if != "any_value_is_missing":
        raise UnsupportedRule(f"{check.name}: the duplicate rule must be a compound uniqueness check ignoring missing keys")
    # Its row_condition only narrows GX's work to possible duplicates (`frame.key_hash_repeated`): not part of the rule.
    _options(expectation, {"row_condition"})
    return KeyRule(check, tuple(expectation.column_list))


@dataclass(frozen=True)
class RowRules:
    """The suite's row rules in SQL: one predicate per reason before DUPLICATE, and the key rule."""

    predicates: dict[str, str]  # reason -> SQL, in REASONS order
    key: KeyRule | None

    def code(self) -> str:
        """Reason code of a row by the rules before DUPLICATE (0: breaks none; i + 1 is REASONS[i])."""
        if not self.predicates:
            return "0::TINYINT"
        arms = " ".join(f"WHEN {sql} THEN {REASONS.index(reason) + 1}" for reason, sql in self.predicates.items())
        return f"(CASE {arms} ELSE 0 END)::TINYINT"


def row_rules(suite: list[Check], types: dict[str, pa.DataType], dialect: Dialect) -> RowRules:
    if REASONS[-1] != DUPLICATE:
        raise UnsupportedRule("routing keeps the first copy among rows breaking no other rule: DUPLICATE must be the last reason")
    by_reason = {c.reason: c for c in suite if c.reason is not None}
    predicates = {r: predicate(by_reason[r], types, dialect) for r in REASONS if r in by_reason and r != DUPLICATE}
    key = key_rule(by_reason[DUPLICATE]) if DUPLICATE in by_reason else None
    return RowRules(predicates, key)
