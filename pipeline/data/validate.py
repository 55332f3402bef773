"""Stage `validate`: raw interactions -> validated interactions + quarantine + report.

A Great Expectations (GX Core 1.x) suite runs over `data/raw/interactions.parquet`:

* batch level: each column of `schema.RAW_COLUMNS` exists and has a contract type, and
  the table holds at least `min_rows` rows;
* row level: user_id, item_id, timestamp and rating are not null (a NaN rating counts as
  null), timestamp lies in [min_timestamp, now + future_tolerance_s], rating lies in
  [rating_min, rating_max], and (user_id, item_id, timestamp) is unique.

A failed batch-level expectation stops the stage with `ValidationFailed`, after the JSON
summary (and the Data Docs) are written; the validated output is not written then. A row
that breaks a row-level rule goes to `data/quarantine/validate.parquet` with the first
rule it breaks as `reason` (order: `REASONS`); for duplicates the first occurrence is kept.
The other rows go to `data/validated/interactions.parquet` unchanged. If the quarantined
share exceeds `max_quarantine_share` the batch fails too; the quarantine file is still
written so a person can look at the rows. Every input row ends up in exactly one file.

Which rows fail is decided by vectorised pandas masks over the frame GX validated, and for
every row-level expectation GX's `unexpected_count` must equal the count of its mask: a
disagreement is a bug on one side and raises `ValidationCrossCheckError`.

Speed (10M rows on 2 cores; "timings_s" in reports/validation.json splits each run):

* GX fingerprints each pandas batch with an MD5 of the whole frame, 3 s at 10M rows with
  int ids and 11 s with string ids, for a batch marker nobody reads.
  `_without_gx_batch_fingerprint` skips it.
* GX's between check runs a Python function per value unless the dtype is exactly
  int64/float64 or datetime, so a float32 rating reaches GX as float64 (exact).
* GX's column-map checks filter the *whole* batch frame on `notnull()` several times per
  expectation, which costs seconds when the frame holds string columns. The two range
  expectations therefore run in a second suite over a frame of just timestamp and rating.
* `ExpectCompoundColumnsToBeUnique` runs `DataFrame.duplicated` over every row: 6 s at 10M
  rows with int ids, 11 s with string ids. A sort-based pre-filter marks the rows whose
  (user, item, timestamp) hash occurs more than once (`KEY_HASH_REPEATED`; equal keys have
  equal hashes, so the other rows cannot be duplicates). GX checks uniqueness with a
  `row_condition` on that column, and pandas runs its exact `duplicated` on those rows only.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import importlib.metadata
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core import schema
from pipeline.core.config import ValidateConfig
from pipeline.core.errors import ValidationFailed
from pipeline.core.io import Layout, write_json, write_parquet

logger = logging.getLogger(__name__)

STAGE = "validate"
QUARANTINE_FILE = "validate.parquet"
SUMMARY_FILE = "validation.json"
DATA_DOCS_DIR = "data_docs"
DATA_DOCS_SITE = "leanrec_validate"
SUITE_TABLE = "raw_interactions"  # batch-level + not-null + uniqueness, on the whole frame
SUITE_RANGES = "raw_interactions_value_ranges"  # the two range checks, on timestamp and rating only

# Helper column of the frame GX sees (never of an output): True where the (user, item,
# timestamp) hash occurs more than once among the rows whose three keys are all present.
KEY_HASH_REPEATED = "_leanrec_key_hash_repeated"

# Row-level reasons in priority order: a row is quarantined with the first that applies.
NULL_USER = "null_user_id"
NULL_ITEM = "null_item_id"
NULL_TIMESTAMP = "null_timestamp"
TIMESTAMP_BEFORE_MIN = "timestamp_before_min"
TIMESTAMP_IN_FUTURE = "timestamp_in_future"
NULL_RATING = "null_rating"
RATING_OUT_OF_RANGE = "rating_out_of_range"
DUPLICATE = "duplicate"
REASONS = (
    NULL_USER,
    NULL_ITEM,
    NULL_TIMESTAMP,
    TIMESTAMP_BEFORE_MIN,
    TIMESTAMP_IN_FUTURE,
    NULL_RATING,
    RATING_OUT_OF_RANGE,
    DUPLICATE,
)

# pandas dtypes the type expectations accept; `_gx_frame` maps the Arrow types onto them.
ID_TYPES = ["Int64Dtype", "StringDtype"]  # Arrow int64 or string / large_string
TIMESTAMP_TYPE = "Timestamp"  # a tz-aware timestamp, any unit (an unambiguous instant); naive fails
RATING_TYPES = ["float32", "float64"]  # Arrow floating point (integers map to Int*Dtype and fail)
SOURCE_TYPES = ["StringDtype"]

# Counts and a few example values per expectation, never GX's full unexpected lists/indices.
RESULT_FORMAT = {"result_format": "BASIC", "partial_unexpected_count": 5, "include_unexpected_rows": False}

_ARROW_INT_TO_PANDAS = {
    pa.int8(): pd.Int8Dtype(),
    pa.int16(): pd.Int16Dtype(),
    pa.int32(): pd.Int32Dtype(),
    pa.int64(): pd.Int64Dtype(),
    pa.uint8(): pd.UInt8Dtype(),
    pa.uint16(): pd.UInt16Dtype(),
    pa.uint32(): pd.UInt32Dtype(),
    pa.uint64(): pd.UInt64Dtype(),
}


class ValidationCrossCheckError(RuntimeError):
    """GX and the pandas masks disagree about a row-level rule: a bug, not a data problem."""


@dataclass
class ValidationResult:
    rows_in: int
    rows_passed: int
    rows_quarantined: int
    quarantined_by_reason: dict[str, int]
    expectations: list[dict]  # one per GX expectation, in suite order (see `_describe`)
    summary_path: Path
    data_docs_path: Path | None


@dataclass
class _Check:
    """One GX expectation: its name in the report, its suite, the columns it needs, and
    whether it is a row-level rule (whose unexpected_count is cross-checked)."""

    name: str
    suite: str
    expectation: Any
    columns: tuple[str, ...] = ()
    row_level: bool = False


# ------------------------------------------------------------------------------ GX plumbing


@functools.cache
def _gx() -> ModuleType:
    """Import GX lazily (about 5 s), with its analytics off before the first import."""
    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    gx_logger = logging.getLogger("great_expectations")
    if gx_logger.level == logging.NOTSET:  # its INFO records are internals (docs registry...)
        gx_logger.setLevel(logging.WARNING)
    import great_expectations

    return great_expectations


def _gx_context(docs_dir: Path | None) -> Any:
    """An in-memory GX context: analytics and progress bars off, at most one local docs site."""
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    sites: dict[str, Any] = {}
    if docs_dir is not None:
        sites[DATA_DOCS_SITE] = {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir.resolve())},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites=sites,
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return _gx().get_context(mode="ephemeral", project_config=config)


@contextlib.contextmanager
def _without_gx_batch_fingerprint() -> Iterator[None]:
    """Skip the MD5 over the whole frame that GX stores as a batch marker.

    GX itself skips it for frames above `HASH_THRESHOLD` bytes; the threshold is lowered to 0
    while our batches load. If a GX upgrade drops the constant, the hash is simply paid.
    """
    _gx()
    from great_expectations.execution_engine import pandas_execution_engine as engine

    if not hasattr(engine, "HASH_THRESHOLD"):
        logger.debug("GX has no HASH_THRESHOLD: batch fingerprint not skipped")
        yield
        return
    saved = engine.HASH_THRESHOLD
    engine.HASH_THRESHOLD = 0
    try:
        yield
    finally:
        engine.HASH_THRESHOLD = saved


def _checks(bounds: dict[str, Any], min_rows: int, present: set[str]) -> list[_Check]:
    """The whole suite. Checks of a missing column other than its existence are left out: the
    batch fails on the missing column anyway, and they would only repeat 'column not found'."""
    from great_expectations.expectations.row_conditions import Column

    E = _gx().expectations
    checks = [_Check(f"column_exists:{c}", SUITE_TABLE, E.ExpectColumnToExist(column=c)) for c in schema.RAW_COLUMNS]
    types = {
        schema.USER: E.ExpectColumnValuesToBeInTypeList(column=schema.USER, type_list=ID_TYPES),
        schema.ITEM: E.ExpectColumnValuesToBeInTypeList(column=schema.ITEM, type_list=ID_TYPES),
        schema.TIMESTAMP: E.ExpectColumnValuesToBeOfType(column=schema.TIMESTAMP, type_=TIMESTAMP_TYPE),
        schema.RATING: E.ExpectColumnValuesToBeInTypeList(column=schema.RATING, type_list=RATING_TYPES),
        schema.SOURCE: E.ExpectColumnValuesToBeInTypeList(column=schema.SOURCE, type_list=SOURCE_TYPES),
    }
    checks += [_Check(f"type:{c}", SUITE_TABLE, e, (c,)) for c, e in types.items()]
    checks.append(_Check("min_rows", SUITE_TABLE, E.ExpectTableRowCountToBeBetween(min_value=min_rows)))
    row_checks = [
        _Check("not_null:user_id", SUITE_TABLE, E.ExpectColumnValuesToNotBeNull(column=schema.USER), (schema.USER,)),
        _Check("not_null:item_id", SUITE_TABLE, E.ExpectColumnValuesToNotBeNull(column=schema.ITEM), (schema.ITEM,)),
        _Check(
            "not_null:timestamp", SUITE_TABLE, E.ExpectColumnValuesToNotBeNull(column=schema.TIMESTAMP), (schema.TIMESTAMP,)
        ),
        _Check("not_null:rating", SUITE_TABLE, E.ExpectColumnValuesToNotBeNull(column=schema.RATING), (schema.RATING,)),
        _Check(
            "unique:user_id,item_id,timestamp",
            SUITE_TABLE,
            E.ExpectCompoundColumnsToBeUnique(
                column_list=list(schema.KEY_COLUMNS),
                ignore_row_if="any_value_is_missing",
                # The sound pre-filter of the module docstring: only these rows can be duplicates.
                row_condition=Column(KEY_HASH_REPEATED) == True,  # noqa: E712 (builds a GX condition)
            ),
            schema.KEY_COLUMNS,
        ),
        _Check(
            "range:timestamp",
            SUITE_RANGES,
            E.ExpectColumnValuesToBeBetween(
                column=schema.TIMESTAMP, min_value=bounds["min_timestamp"], max_value=bounds["max_timestamp"]
            ),
            (schema.TIMESTAMP,),
        ),
        _Check(
            "range:rating",
            SUITE_RANGES,
            E.ExpectColumnValuesToBeBetween(
                column=schema.RATING, min_value=bounds["rating_min"], max_value=bounds["rating_max"]
            ),
            (schema.RATING,),
        ),
    ]
    for check in row_checks:
        check.row_level = True
    checks = [c for c in checks + row_checks if set(c.columns) <= present]
    for check in checks:
        check.expectation.meta = {"check": check.name}
    return checks


def _run_gx(frames: dict[str, pd.DataFrame], checks: list[_Check], docs_dir: Path | None) -> tuple[Any, list[Any]]:
    """Run one GX suite per frame; returns the context (for Data Docs) and one result per check."""
    gx = _gx()
    context = _gx_context(docs_dir)
    source = context.data_sources.add_pandas("leanrec")
    results: dict[int, Any] = {}
    for suite_name, frame in frames.items():
        members = [c for c in checks if c.suite == suite_name]
        if not members:
            continue
        batch = source.add_dataframe_asset(suite_name).add_batch_definition_whole_dataframe("whole_file")
        suite = context.suites.add(gx.ExpectationSuite(name=suite_name, expectations=[c.expectation for c in members]))
        definition = context.validation_definitions.add(gx.ValidationDefinition(name=suite_name, data=batch, suite=suite))
        with _without_gx_batch_fingerprint():
            run = definition.run(batch_parameters={"dataframe": frame}, result_format=RESULT_FORMAT)
        # GX does not return results in suite order: match them back by expectation id.
        by_id = {r.expectation_config.id: r for r in run.results}
        for check, added in zip(members, suite.expectations, strict=True):
            results[id(check)] = by_id[added.id]
    return context, [results[id(c)] for c in checks]


def _new_site_dir(reports_dir: Path) -> Path:
    reports_dir.mkdir(parents=True, exist_ok=True)
    build_dir = Path(tempfile.mkdtemp(prefix=f".{DATA_DOCS_DIR}.", dir=reports_dir))
    build_dir.chmod(0o755)  # not mkdtemp's 0700: the directory becomes the site
    return build_dir


def _swap_in(build_dir: Path, target: Path) -> Path:
    """Put the finished site `build_dir` in place of `target` (two renames, never half a site)."""
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    if target.exists():
        os.replace(target, old)
    os.replace(build_dir, target)
    shutil.rmtree(old, ignore_errors=True)
    return target / "index.html"


def _build_data_docs(context: Any, build_dir: Path, target: Path) -> Path:
    """Render the GX site into `build_dir`, then swap it in for `target`."""
    context.build_data_docs(site_names=[DATA_DOCS_SITE])
    if not (build_dir / "index.html").exists():
        raise RuntimeError(f"GX built no Data Docs index in {build_dir}")
    return _swap_in(build_dir, target)


def _data_docs_placeholder(reports_dir: Path, target: Path) -> None:
    """With data_docs off, `target` still exists (dvc.yaml lists it as an output) and holds a
    page saying so rather than an earlier run's site."""
    build_dir = _new_site_dir(reports_dir)
    (build_dir / "index.html").write_text(
        "<!doctype html><title>LeanRec validation</title>"
        f"<p>Data Docs were not built: validate.data_docs is false. See ../{SUMMARY_FILE}.</p>\n",
        encoding="utf-8",
    )
    _swap_in(build_dir, target)


# ------------------------------------------------------------------------------ pandas side


def _gx_frame(table: pa.Table) -> pd.DataFrame:
    """The pandas frame GX validates, with dtypes that keep the Arrow types apart.

    Integers map to nullable pandas integers (not to float64 when they hold nulls), strings
    to `StringDtype`, the null type to an Arrow-backed dtype that no type check accepts;
    floats reach GX as float64 (exact for float32), the one float dtype its between check
    vectorises. Columns outside the contract are not validated and not converted.
    """
    sub = table.select([c for c in schema.RAW_COLUMNS if c in table.column_names])
    for i, field in enumerate(sub.schema):
        if pa.types.is_floating(field.type) and field.type != pa.float64():
            sub = sub.set_column(i, field.name, pc.cast(sub.column(i), pa.float64()))

    def mapper(arrow_type: pa.DataType) -> Any:
        if arrow_type in _ARROW_INT_TO_PANDAS:
            return _ARROW_INT_TO_PANDAS[arrow_type]
        if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
            return pd.StringDtype()
        if pa.types.is_null(arrow_type):
            return pd.ArrowDtype(arrow_type)
        return None

    return sub.to_pandas(types_mapper=mapper)


def _string_tail_feature(chunk: pa.Array) -> np.ndarray:
    """uint64 per string: its last (up to) 8 bytes, mixed with its byte length.

    Read straight from the Arrow offsets and data buffers: a gather of 8 bytes per row,
    where hashing every string (pandas or a dictionary encode) takes seconds at 10M rows.
    """
    n = len(chunk)
    offset_type = np.int64 if pa.types.is_large_string(chunk.type) else np.int32
    _, offsets_buf, data_buf = chunk.buffers()
    if n == 0 or offsets_buf is None:
        return np.zeros(n, dtype=np.uint64)
    offsets = np.frombuffer(offsets_buf, dtype=offset_type)[chunk.offset : chunk.offset + n + 1].astype(np.int64)
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, dtype=np.uint8)
    padded = np.concatenate([np.zeros(8, dtype=np.uint8), data])  # so a window never starts before 0
    windows = np.lib.stride_tricks.sliding_window_view(padded, 8)  # windows[e] = data[e - 8 : e]
    end = offsets[1:]
    length = end - offsets[:-1]
    tail = np.ascontiguousarray(windows[end]).view("<u8").ravel()  # last byte most significant
    kept = np.minimum(length, 8)
    tail = np.where(kept > 0, tail >> (8 * (8 - kept)).astype(np.uint64), np.uint64(0))  # drop the previous string's bytes
    return tail * np.uint64(0x9E3779B97F4A7C15) ^ length.astype(np.uint64)


def _key_feature(column: pa.ChunkedArray) -> np.ndarray:
    """uint64 per row, equal for equal values (anything under a null).

    Integers and timestamps give their value, strings `_string_tail_feature`.
    """
    arrow_type = column.type
    if pa.types.is_integer(arrow_type) or pa.types.is_timestamp(arrow_type):
        values = column if pa.types.is_integer(arrow_type) else pc.cast(column, pa.int64())
        return np.asarray(values.fill_null(0).to_numpy(), dtype=np.int64).view(np.uint64)
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        parts = [_string_tail_feature(chunk) for chunk in column.chunks]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)
    raise TypeError(f"no key feature for Arrow type {arrow_type}")


def _key_hash_repeated(table: pa.Table, complete: np.ndarray) -> np.ndarray:
    """True for the complete-key rows whose (user, item, timestamp) hash is not unique.

    A superset of the duplicated rows, since equal keys hash equal. The combination only has
    to be deterministic; its spread just decides how few unique keys collide. Sort-based:
    sorting 10M uint64 takes well under a second, a hash table over 10M keys seconds.
    """
    out = np.zeros(table.num_rows, dtype=bool)
    if not complete.any():
        return out
    user, item, ts = (_key_feature(table.column(c)) for c in schema.KEY_COLUMNS)
    h = user * np.uint64(0xBF58476D1CE4E5B9)
    h ^= item
    h *= np.uint64(0x94D049BB133111EB)
    h ^= ts
    h = h[complete]
    ordered = np.sort(h)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if repeated.size:
        out[complete] = pd.Series(h).isin(np.unique(repeated)).to_numpy()
    return out


def _row_masks(frame: pd.DataFrame, bounds: dict[str, Any]) -> dict[str, np.ndarray]:
    """One boolean mask per reason except `duplicate`, over all rows, with GX's semantics:
    a range rule only judges non-null values."""
    ts = frame[schema.TIMESTAMP]
    rating = frame[schema.RATING]
    ts_present = ts.notna().to_numpy()
    rating_present = rating.notna().to_numpy()

    def flag(condition: pd.Series) -> np.ndarray:
        return condition.to_numpy(dtype=bool, na_value=False)

    return {
        NULL_USER: frame[schema.USER].isna().to_numpy(),
        NULL_ITEM: frame[schema.ITEM].isna().to_numpy(),
        NULL_TIMESTAMP: ~ts_present,
        TIMESTAMP_BEFORE_MIN: ts_present & flag(ts < bounds["min_timestamp"]),
        TIMESTAMP_IN_FUTURE: ts_present & flag(ts > bounds["max_timestamp"]),
        NULL_RATING: ~rating_present,
        RATING_OUT_OF_RANGE: rating_present & flag((rating < bounds["rating_min"]) | (rating > bounds["rating_max"])),
    }


def _assign_reasons(frame: pd.DataFrame, masks: dict[str, np.ndarray], candidates: np.ndarray) -> tuple[np.ndarray, int]:
    """Reason code per row (0 passes, i + 1 is REASONS[i]), and the duplicate count GX reports.

    Duplicates are looked for among the rows that pass every other rule, keeping the first
    of them, so a valid row is never dropped because an invalid copy of it came earlier.
    """
    codes = np.zeros(len(frame), dtype=np.int8)
    for i, reason in enumerate(REASONS[:-1]):
        codes[(codes == 0) & masks[reason]] = i + 1
    keys = list(schema.KEY_COLUMNS)
    # GX counts every row of a repeated key among complete rows (duplicated keep=False).
    gx_duplicates = int(frame.loc[candidates, keys].duplicated(keep=False).sum()) if candidates.any() else 0
    eligible = candidates & (codes == 0)
    if eligible.any():
        later_copy = frame.loc[eligible, keys].duplicated(keep="first").to_numpy()
        codes[np.flatnonzero(eligible)[later_copy]] = REASONS.index(DUPLICATE) + 1
    return codes, gx_duplicates


def _gx_expected_counts(masks: dict[str, np.ndarray], gx_duplicates: int) -> dict[str, int]:
    """What each row-level expectation's unexpected_count must be, from the masks."""
    return {
        "not_null:user_id": int(masks[NULL_USER].sum()),
        "not_null:item_id": int(masks[NULL_ITEM].sum()),
        "not_null:timestamp": int(masks[NULL_TIMESTAMP].sum()),
        "not_null:rating": int(masks[NULL_RATING].sum()),
        "range:timestamp": int((masks[TIMESTAMP_BEFORE_MIN] | masks[TIMESTAMP_IN_FUTURE]).sum()),
        "range:rating": int(masks[RATING_OUT_OF_RANGE].sum()),
        "unique:user_id,item_id,timestamp": gx_duplicates,
    }


# ------------------------------------------------------------------------------ reporting


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if value is pd.NA or value is pd.NaT:
        return None
    return str(value)


_NOTES = {
    "unique:user_id,item_id,timestamp": f"GX checks the rows where {KEY_HASH_REPEATED} is true (a sound pre-filter: "
    "rows whose key hash is unique cannot be duplicates), so element_count counts those rows only",
}


def _describe(check: _Check, result: Any) -> dict[str, Any]:
    config = result.expectation_config
    body = result.result or {}
    exception = result.exception_info or {}
    note = {"note": _NOTES[check.name]} if check.name in _NOTES else {}
    return _jsonable(
        note
        | {
            "check": check.name,
            "suite": check.suite,
            "expectation": config.type,
            "column": config.kwargs.get("column"),
            "columns": config.kwargs.get("column_list"),
            "kwargs": {k: v for k, v in config.kwargs.items() if k not in ("batch_id", "column", "column_list")},
            "success": bool(result.success),
            "unexpected_count": body.get("unexpected_count"),
            "element_count": body.get("element_count"),
            "missing_count": body.get("missing_count"),
            "unexpected_percent": body.get("unexpected_percent"),
            "observed_value": body.get("observed_value"),
            "partial_unexpected_list": body.get("partial_unexpected_list"),
            "exception": exception.get("exception_message") if exception.get("raised_exception") else None,
        }
    )


def _name(entry: dict[str, Any]) -> str:
    target = entry["column"] or ",".join(entry["columns"] or [])
    return f"{entry['expectation']}({target})" if target else entry["expectation"]


def _batch_failure(entry: dict[str, Any], rows_in: int, min_rows: int) -> str:
    name = _name(entry)
    if entry["expectation"] == "expect_column_to_exist":
        return f"{name} failed: required column {entry['column']!r} is missing"
    if entry["expectation"] == "expect_table_row_count_to_be_between":
        return f"{name} failed: {rows_in} rows < validate.min_rows {min_rows}"
    if entry["exception"]:
        return f"{name} failed: {entry['exception']}"
    expected = entry["kwargs"].get("type_list") or entry["kwargs"].get("type_")
    return f"{name} failed: observed type {entry['observed_value']!r}, expected one of {expected!r}"


def _utc(moment: dt.datetime) -> dt.datetime:
    """Naive datetimes (e.g. an ISO string without offset in params.yaml) are read as UTC."""
    return moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment


# ------------------------------------------------------------------------------ the stage


class _Run:
    """State of one run: paths, the summary being filled in, timings."""

    def __init__(self, cfg: ValidateConfig, layout: Layout, now: dt.datetime) -> None:
        self.cfg = cfg
        self.started = time.perf_counter()
        self.source = layout.raw_interactions
        self.validated_path = layout.validated_interactions
        self.quarantine_path = layout.quarantine_dir / QUARANTINE_FILE
        self.summary_path = layout.reports_dir / SUMMARY_FILE
        self.docs_target = layout.reports_dir / DATA_DOCS_DIR
        self.bounds = {
            "min_timestamp": _utc(cfg.min_timestamp),
            "max_timestamp": now + dt.timedelta(seconds=cfg.future_tolerance_s),
            "rating_min": float(cfg.rating_min),
            "rating_max": float(cfg.rating_max),
        }
        self.timings: dict[str, float] = {}
        self.summary: dict[str, Any] = {
            "stage": STAGE,
            "success": False,
            "input": str(self.source),
            "validated_at": now.isoformat(),
            "gx_version": importlib.metadata.version("great_expectations"),
            "thresholds": _jsonable(
                {
                    "min_rows": cfg.min_rows,
                    "min_timestamp": self.bounds["min_timestamp"],
                    "now": now,
                    "future_tolerance_s": cfg.future_tolerance_s,
                    "max_timestamp": self.bounds["max_timestamp"],
                    "rating_min": cfg.rating_min,
                    "rating_max": cfg.rating_max,
                    "max_quarantine_share": cfg.max_quarantine_share,
                }
            ),
            "rows_in": None,
            "rows_passed": None,
            "rows_quarantined": None,
            "quarantine_share": None,
            "rows_accounted_for": None,
            "quarantined_by_reason": {},
            "rule_violations": {},
            "expectations": [],
            "checks": [],
            "failures": [],
            "outputs": {"validated": None, "quarantine": None, "data_docs": None},
            "timings_s": self.timings,
        }

    def lap(self, name: str, since: float) -> float:
        now = time.perf_counter()
        self.timings[name] = round(now - since, 3)
        return now

    def write_summary(self) -> None:
        self.timings["total"] = round(time.perf_counter() - self.started, 3)
        write_json(self.summary, self.summary_path)

    def fail(self, failures: list[str], counts: str) -> ValidationFailed:
        """Write the summary (success false) and return the error that stops the stage."""
        self.summary["failures"] = failures
        self.write_summary()
        logger.error("validate: batch failed: %s [%s]; summary in %s", "; ".join(failures), counts, self.summary_path)
        return ValidationFailed(
            f"validation of {self.source} failed: {'; '.join(failures)} [{counts}]; see {self.summary_path}"
        )


def _read(run: _Run) -> pa.Table:
    try:
        return pq.read_table(run.source)
    except FileNotFoundError:
        problem = f"{run.source} does not exist (run the ingest stage first)"
    except (pa.ArrowException, OSError) as err:
        problem = f"{run.source} is not a readable Parquet file ({err})"
    run.summary["checks"].append({"check": "readable_parquet", "success": False, "observed_value": problem})
    raise run.fail([f"check 'readable_parquet' failed: {problem}"], "rows_in=0")


def run_validate(cfg: ValidateConfig, layout: Layout, now: dt.datetime | None = None) -> ValidationResult:
    """Validate `layout.raw_interactions` (see the module docstring); raises ValidationFailed."""
    run = _Run(cfg, layout, _utc(now or dt.datetime.now(dt.UTC)))
    summary = run.summary
    # A run's outputs are what it wrote: no earlier run's file may sit beside a failed batch.
    for stale in (run.validated_path, run.quarantine_path):
        if stale.exists():
            logger.debug("validate: removing the previous run's %s", stale)
            stale.unlink()

    # 1. read (Arrow keeps the exact input types for the outputs; pandas is what GX checks)
    t = time.perf_counter()
    table = _read(run)
    summary["checks"].append({"check": "readable_parquet", "success": True, "observed_value": None})
    rows_in = table.num_rows
    summary.update(
        rows_in=rows_in,
        schema={f.name: str(f.type) for f in table.schema},
        extra_columns=[c for c in table.column_names if c not in schema.RAW_COLUMNS],
    )
    t = run.lap("read_parquet", t)
    frame = _gx_frame(table)
    t = run.lap("to_pandas", t)

    # 2. duplicate pre-filter, which GX's uniqueness check is conditioned on
    candidates = np.zeros(rows_in, dtype=bool)
    if set(schema.KEY_COLUMNS) <= set(frame.columns):
        complete = ~np.logical_or.reduce([frame[c].isna().to_numpy() for c in schema.KEY_COLUMNS])
        try:
            candidates = _key_hash_repeated(table, complete)
        except TypeError:  # a key column of a type the type checks reject; exact check on all rows
            candidates = complete
    frame[KEY_HASH_REPEATED] = candidates
    t = run.lap("duplicate_prefilter", t)

    # 3. GX
    _gx()
    t = run.lap("gx_import", t)  # once per process
    checks = _checks(run.bounds, cfg.min_rows, set(frame.columns))
    ranges = [c for c in (schema.TIMESTAMP, schema.RATING) if c in frame.columns]
    build_dir = _new_site_dir(layout.reports_dir) if cfg.data_docs else None
    docs_index: Path | None = None
    try:
        context, results = _run_gx({SUITE_TABLE: frame, SUITE_RANGES: frame[ranges]}, checks, build_dir)
        entries = [_describe(c, r) for c, r in zip(checks, results, strict=True)]
        summary["expectations"] = entries
        t = run.lap("gx_validate", t)
        if build_dir is not None:
            docs_index = _build_data_docs(context, build_dir, run.docs_target)
            build_dir = None
            summary["outputs"]["data_docs"] = str(docs_index)
            t = run.lap("gx_data_docs", t)
        else:
            _data_docs_placeholder(layout.reports_dir, run.docs_target)
    finally:
        if build_dir is not None:
            shutil.rmtree(build_dir, ignore_errors=True)

    # 4. batch-level expectations
    failed = [
        _batch_failure(entry, rows_in, cfg.min_rows)
        for check, entry in zip(checks, entries, strict=True)
        if not check.row_level and not entry["success"]
    ]
    if failed:
        raise run.fail(failed, f"rows_in={rows_in}")

    # 5. row-level masks, cross-checked against GX's counts
    masks = _row_masks(frame, run.bounds)
    codes, gx_duplicates = _assign_reasons(frame, masks, candidates)
    expected_counts = _gx_expected_counts(masks, gx_duplicates)
    for check, entry in zip(checks, entries, strict=True):
        if not check.row_level:
            continue
        expected = expected_counts[check.name]
        entry["mask_count"] = expected
        if entry["exception"] is not None or entry["unexpected_count"] != expected:
            problem = (
                f"{_name(entry)}: GX counts {entry['unexpected_count']} unexpected rows "
                f"(exception: {entry['exception']}), the pandas mask {expected}"
            )
            summary["failures"] = [f"internal cross-check failed: {problem}"]
            run.write_summary()
            raise ValidationCrossCheckError(problem)
    per_code = np.bincount(codes, minlength=len(REASONS) + 1)
    by_reason = {reason: int(per_code[i + 1]) for i, reason in enumerate(REASONS) if per_code[i + 1]}
    rows_passed = int(per_code[0])
    rows_quarantined = int(per_code[1:].sum())
    if rows_passed + rows_quarantined != rows_in:  # bincount makes this impossible; kept as a guard
        raise ValidationCrossCheckError(f"rows_in {rows_in} != passed {rows_passed} + quarantined {rows_quarantined}")
    share = rows_quarantined / rows_in if rows_in else 0.0
    summary.update(
        rows_passed=rows_passed,
        rows_quarantined=rows_quarantined,
        quarantine_share=share,
        rows_accounted_for=True,
        quarantined_by_reason=by_reason,
        rule_violations={r: int(masks[r].sum()) for r in REASONS[:-1]} | {"duplicate_key_rows": gx_duplicates},
    )
    t = run.lap("row_masks", t)

    # 6. quarantine: written on a share failure too, it is what a person needs to look at
    bad = codes != 0
    reasons = pa.DictionaryArray.from_arrays(pa.array(codes[bad] - 1, type=pa.int8()), pa.array(REASONS, pa.string()))
    quarantine = table.filter(pa.array(bad))
    quarantine = quarantine.append_column(schema.QUARANTINE_REASON, reasons.cast(pa.string()))
    stage = pa.repeat(pa.scalar(STAGE, pa.string()), rows_quarantined)
    quarantine = quarantine.append_column(schema.QUARANTINE_STAGE, stage)
    write_parquet(quarantine, run.quarantine_path)
    summary["outputs"]["quarantine"] = str(run.quarantine_path)
    t = run.lap("write_quarantine", t)

    share_ok = share <= cfg.max_quarantine_share
    summary["checks"].append(
        {
            "check": "max_quarantine_share",
            "success": share_ok,
            "observed_value": share,
            "threshold": cfg.max_quarantine_share,
        }
    )
    if not share_ok:
        raise run.fail(
            [
                f"check 'max_quarantine_share' failed: {rows_quarantined} of {rows_in} rows quarantined, share "
                f"{share:.4f} > validate.max_quarantine_share {cfg.max_quarantine_share} (by reason: {by_reason})"
            ],
            f"rows_in={rows_in}, rows_passed={rows_passed}, rows_quarantined={rows_quarantined}",
        )

    # 7. validated output
    write_parquet(table.filter(pa.array(~bad)), run.validated_path)
    summary["outputs"]["validated"] = str(run.validated_path)
    run.lap("write_validated", t)
    summary["success"] = True
    run.write_summary()
    logger.info(
        "validate: %d rows in, %d passed, %d quarantined %s in %.1fs -> %s",
        rows_in, rows_passed, rows_quarantined, by_reason, run.timings["total"], run.validated_path,
    )
    return ValidationResult(
        rows_in=rows_in,
        rows_passed=rows_passed,
        rows_quarantined=rows_quarantined,
        quarantined_by_reason=by_reason,
        expectations=entries,
        summary_path=run.summary_path,
        data_docs_path=docs_index,
    )
