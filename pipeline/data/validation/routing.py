"""Rows to outputs, from GX's verdicts alone: the failing rows each row rule's result lists."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.core import schema

from .rules import DUPLICATE, REASONS, ROW_ID, Check

STAGE = "validate"


def failing_rows(check: Check, result: Any, rows_in: int) -> np.ndarray:
    """The ROW_IDs GX lists as failing `check` (every one: result_format COMPLETE).

    With exclude_unexpected_values GX lists them as `[{ROW_ID: [ids]}]`, or `[]` when none fail.
    A list that does not hold exactly `unexpected_count` valid ids means the result format was not
    honoured; routing on it would lose rows, so it stops the stage.
    """
    body = result.result or {}
    listed = body.get("unexpected_index_list")
    if listed is None:
        raise RuntimeError(f"GX listed no failing rows for {check.name} (result: {sorted(body)})")
    ids = np.asarray(listed[0][ROW_ID], dtype=np.int64) if listed else np.zeros(0, dtype=np.int64)
    if ids.size != body.get("unexpected_count") or (ids.size and not 0 <= ids.min() <= ids.max() < rows_in):
        raise RuntimeError(f"GX listed {ids.size} failing rows for {check.name}, counted {body.get('unexpected_count')}")
    return ids


def assign_reasons(frame: pd.DataFrame, failing: dict[str, np.ndarray]) -> np.ndarray:
    """Reason code per row (0 passes, i + 1 is REASONS[i]): the first reason whose rule GX says the
    row breaks.

    GX's compound uniqueness check lists every member of a repeated key, the first occurrence
    included (pandas `duplicated(keep=False)`). Keep-first is routing, not a rule: among the rows
    GX listed that break no other rule, pandas `duplicated(keep="first")` picks the later copies,
    so a valid row is never dropped because an invalid copy of it came earlier. It runs on the
    rows GX listed only, and cannot mark a row GX did not list.
    """
    codes = np.zeros(len(frame), dtype=np.int8)
    for code, reason in enumerate(REASONS, start=1):
        ids = failing.get(reason)
        if ids is None or not ids.size:
            continue
        ids = ids[codes[ids] == 0]
        if reason == DUPLICATE:
            ids = np.sort(ids)  # input order: "first" is the earliest row
            ids = ids[frame.iloc[ids][list(schema.KEY_COLUMNS)].duplicated(keep="first").to_numpy()]
        codes[ids] = code
    return codes


def quarantine_table(table: pa.Table, codes: np.ndarray) -> pa.Table:
    """The input rows with a reason, in input order, with their `reason` and `stage` columns."""
    bad = codes != 0
    reasons = pa.DictionaryArray.from_arrays(pa.array(codes[bad] - 1, type=pa.int8()), pa.array(REASONS, pa.string()))
    quarantine = table.filter(pa.array(bad))
    quarantine = quarantine.append_column(schema.QUARANTINE_REASON, reasons.cast(pa.string()))
    stage = pa.repeat(pa.scalar(STAGE, pa.string()), int(bad.sum()))
    return quarantine.append_column(schema.QUARANTINE_STAGE, stage)
