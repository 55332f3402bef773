"""Stage `validate`: raw interactions -> validated interactions, quarantine, a report.

A Great Expectations (GX Core 1.x) suite is run over `data/raw/interactions.parquet`:

* batch level: every column of `schema.RAW_COLUMNS` exists and has a contract type,
  and the table holds at least `min_rows` rows;
* row level: no null user_id/item_id/timestamp/rating, timestamp within
  [min_timestamp, now + future_tolerance_s], rating within [rating_min, rating_max],
  and (user_id, item_id, timestamp) unique.

Batch-level failures stop the stage (`ValidationFailed`) after the JSON summary (and the
Data Docs) are written; the validated output is then not written. Rows failing a row-level
rule go to `data/quarantine/validate.parquet` with their first failing `reason`; the others
go to `data/validated/interactions.parquet`, unchanged. If the quarantined share exceeds
`max_quarantine_share` the batch fails as well (the quarantine file is still written, so a
person can look at the rows). Every input row ends up in exactly one of the two files.

Which rows fail is decided by vectorised pandas masks computed on the same frame GX
validates. For every row-level expectation, GX's `unexpected_count` must equal the count
of the matching mask; a disagreement is a bug in one of the two and raises
`ValidationCrossCheckError`.

Performance notes (10M rows, see the module's report in reports/validation.json "timings_s"):

* GX fingerprints every pandas batch by hashing the whole frame (an MD5 batch marker, 3 to 11 s
  at 10M rows, more with string ids). It is skipped by `_without_gx_batch_fingerprint`.
* `ExpectColumnValuesToBeBetween` falls back to a per-element Python `map` unless the dtype
  is exactly int64/float64 or datetime, so a float32 rating is handed to GX as float64.
* `ExpectCompoundColumnsToBeUnique` runs `DataFrame.duplicated` over all rows (6 to 11 s at
  10M rows). A cheap, sound pre-filter marks the rows whose (user, item, timestamp) hash
  occurs more than once (`KEY_HASH_REPEATED`); equal keys have equal hashes, so rows outside
  it cannot be duplicates. GX checks compound uniqueness with `row_condition` on that
  column and pandas runs the exact `duplicated` only on those rows.
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

from pipeline import schema
from pipeline.config import ValidateConfig
from pipeline.errors import ValidationFailed
from pipeline.io import Layout, write_json, write_parquet

logger = logging.getLogger(__name__)

STAGE = "validate"
QUARANTINE_FILE = "validate.parquet"
SUMMARY_FILE = "validation.json"
DATA_DOCS_DIR = "data_docs"
SUITE_NAME = "raw_interactions"
DATA_DOCS_SITE = "leanrec_validate"

# Helper column added to the frame GX sees (never to an output): True where the
# (user, item, timestamp) hash occurs more than once among rows with all three keys present.
KEY_HASH_REPEATED = "_leanrec_key_hash_repeated"

# Row-level reasons, in priority order: a row is quarantined with the first that applies.
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

# pandas dtypes GX must observe (see `_gx_frame` for how Arrow types map onto them).
ID_TYPES = ["Int64Dtype", "StringDtype"]  # Arrow int64 / string
TIMESTAMP_TYPE = "Timestamp"  # any tz-aware timestamp (an unambiguous instant); naive ones fail
RATING_TYPES = ["float32", "float64"]
SOURCE_TYPES = ["StringDtype"]

# Counts and a few examples per expectation; never GX's full unexpected value/index lists.
_RESULT_FORMAT = {
    "result_format": "BASIC",  # counts, no unexpected index lists
    "partial_unexpected_count": 5,
    "include_unexpected_rows": False,
}

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
    expectations: list[dict]
    summary_path: Path
    data_docs_path: Path | None


@dataclass
class _Rule:
    """One row-level rule: its GX expectation and the pandas mask GX's count must match."""

    check: str
    expectation: Any  # a gx.expectations.Expectation
    reasons: tuple[str, ...]  # masks whose union is what GX counts as unexpected


# --------------------------------------------------------------------------- GX plumbing


@functools.cache
def _gx() -> ModuleType:
    """Import GX lazily (it is slow to import) with its analytics switched off first."""
    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    import great_expectations

    return great_expectations


def _gx_context(docs_dir: Path | None) -> Any:
    """An in-memory GX context: no analytics, no progress bars, at most one local docs site."""
    gx = _gx()
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
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites=sites,
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return gx.get_context(mode="ephemeral", project_config=config)


@contextlib.contextmanager
def _without_gx_batch_fingerprint() -> Iterator[None]:
    """Skip the MD5 of the whole frame GX takes as a batch marker when loading a pandas batch.

    GX skips it by itself for frames over HASH_THRESHOLD bytes; lowering the threshold for the
    duration of the run skips it always. It only feeds `batch_markers.pandas_data_fingerprint`.
    """
    from great_expectations.execution_engine import pandas_execution_engine as engine

    if not hasattr(engine, "HASH_THRESHOLD"):  # a GX upgrade moved it: pay the hash, stay correct
        logger.debug("GX has no HASH_THRESHOLD; batch fingerprint not skipped")
        yield
        return
    saved = engine.HASH_THRESHOLD
    engine.HASH_THRESHOLD = 0
    try:
        yield
    finally:
        engine.HASH_THRESHOLD = saved


def _build_suite(cfg_bounds: dict[str, Any], min_rows: int, columns: list[str]) -> tuple[list[Any], list[_Rule]]:
    """The batch-level expectations and the row-level rules (with their expectations)."""
    from great_expectations.expectations.row_conditions import Column

    E = _gx().expectations
    batch: list[Any] = [E.ExpectColumnToExist(column=c, meta={"check": f"column_exists:{c}"}) for c in schema.RAW_COLUMNS]
    batch += [
        E.ExpectColumnValuesToBeInTypeList(column=schema.USER, type_list=ID_TYPES, meta={"check": "type:user_id"}),
        E.ExpectColumnValuesToBeInTypeList(column=schema.ITEM, type_list=ID_TYPES, meta={"check": "type:item_id"}),
        E.ExpectColumnValuesToBeOfType(column=schema.TIMESTAMP, type_=TIMESTAMP_TYPE, meta={"check": "type:timestamp"}),
        E.ExpectColumnValuesToBeInTypeList(column=schema.RATING, type_list=RATING_TYPES, meta={"check": "type:rating"}),
        E.ExpectColumnValuesToBeInTypeList(column=schema.SOURCE, type_list=SOURCE_TYPES, meta={"check": "type:source"}),
        E.ExpectTableRowCountToBeBetween(min_value=min_rows, meta={"check": "min_rows"}),
    ]
    present = set(columns)
    rules = [
        _Rule("not_null:user_id", E.ExpectColumnValuesToNotBeNull(column=schema.USER), (NULL_USER,)),
        _Rule("not_null:item_id", E.ExpectColumnValuesToNotBeNull(column=schema.ITEM), (NULL_ITEM,)),
        _Rule("not_null:timestamp", E.ExpectColumnValuesToNotBeNull(column=schema.TIMESTAMP), (NULL_TIMESTAMP,)),
        _Rule(
            "range:timestamp",
            E.ExpectColumnValuesToBeBetween(
                column=schema.TIMESTAMP, min_value=cfg_bounds["min_timestamp"], max_value=cfg_bounds["max_timestamp"]
            ),
            (TIMESTAMP_BEFORE_MIN, TIMESTAMP_IN_FUTURE),
        ),
        _Rule("not_null:rating", E.ExpectColumnValuesToNotBeNull(column=schema.RATING), (NULL_RATING,)),
        _Rule(
            "range:rating",
            E.ExpectColumnValuesToBeBetween(
                column=schema.RATING, min_value=cfg_bounds["rating_min"], max_value=cfg_bounds["rating_max"]
            ),
            (RATING_OUT_OF_RANGE,),
        ),
        _Rule(
            "unique:user_id,item_id,timestamp",
            E.ExpectCompoundColumnsToBeUnique(
                column_list=list(schema.KEY_COLUMNS),
                ignore_row_if="any_value_is_missing",
                # Sound pre-filter (see module doc): exact check on the rows that can be duplicates.
                row_condition=Column(KEY_HASH_REPEATED) == True,  # noqa: E712 (builds a GX condition)
            ),
            (DUPLICATE,),
        ),
    ]
    # A row-level rule on a missing column only repeats "column not found"; the batch fails anyway.
    rules = [r for r in rules if set(_expectation_columns(r.expectation)) <= present]
    for rule in rules:
        rule.expectation.meta = {"check": rule.check}
    return batch, rules


def _expectation_columns(expectation: Any) -> list[str]:
    kwargs = expectation.configuration.kwargs
    if "column" in kwargs:
        return [kwargs["column"]]
    return list(kwargs.get("column_list") or [])


def _run_gx(frame: pd.DataFrame, expectations: list[Any], docs_dir: Path | None) -> tuple[Any, list[Any]]:
    """Validate `frame` with GX; returns the context (for Data Docs) and the results in suite order."""
    gx = _gx()
    context = _gx_context(docs_dir)
    batch_definition = (
        context.data_sources.add_pandas("leanrec")
        .add_dataframe_asset("raw_interactions")
        .add_batch_definition_whole_dataframe("whole_file")
    )
    suite = context.suites.add(gx.ExpectationSuite(name=SUITE_NAME, expectations=expectations))
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="validate_raw_interactions", data=batch_definition, suite=suite)
    )
    with _without_gx_batch_fingerprint():
        run = definition.run(batch_parameters={"dataframe": frame}, result_format=_RESULT_FORMAT)
    # GX does not return results in suite order: put them back by expectation id.
    by_id = {r.expectation_config.id: r for r in run.results}
    ordered = [by_id[e.id] for e in suite.expectations]
    return context, ordered


def _build_data_docs(context: Any, target: Path, build_dir: Path) -> Path:
    """Render the site GX built into `build_dir`, then swap it in for `target`."""
    context.build_data_docs(site_names=[DATA_DOCS_SITE])
    index = build_dir / "index.html"
    if not index.exists():
        raise RuntimeError(f"GX built no Data Docs index at {index}")
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    if target.exists():
        os.replace(target, old)
    os.replace(build_dir, target)
    shutil.rmtree(old, ignore_errors=True)
    return target / "index.html"


# --------------------------------------------------------------------------- pandas side


def _gx_frame(table: pa.Table) -> pd.DataFrame:
    """The pandas frame GX validates, with dtypes that keep the Arrow types distinguishable.

    Integers map to nullable pandas integers (never to float64 because of nulls), strings to
    `StringDtype`, the null type to an Arrow-backed dtype no type expectation accepts. float32
    goes to GX as float64 (exact) because GX's between check is only vectorised for float64.
    """
    columns = [c for c in schema.RAW_COLUMNS if c in table.column_names]
    sub = table.select(columns)
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


def _key_feature(column: pa.ChunkedArray) -> np.ndarray:
    """A uint64 per row such that equal values give equal features (nulls give garbage).

    Integers and timestamps give their value; strings give their byte length (cheap,
    hashing 10M strings costs seconds). Only used as a pre-filter for the exact check.
    """
    arrow_type = column.type
    if pa.types.is_timestamp(arrow_type) or pa.types.is_integer(arrow_type):
        values = pc.cast(column, pa.int64()) if not pa.types.is_integer(arrow_type) else column
        return np.asarray(values.fill_null(0).to_numpy(), dtype=np.int64).view(np.uint64)
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return np.asarray(pc.binary_length(column).fill_null(0).to_numpy(), dtype=np.int64).view(np.uint64)
    raise TypeError(f"no key feature for Arrow type {arrow_type}")


_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, in place on a uint64 array."""
    x ^= x >> np.uint64(30)
    x *= _M2
    x ^= x >> np.uint64(27)
    x *= _M3
    x ^= x >> np.uint64(31)
    return x


def _key_hash_repeated(table: pa.Table, complete: np.ndarray) -> np.ndarray:
    """True for complete-key rows whose (user, item, timestamp) hash occurs more than once.

    A superset of the duplicated rows: equal keys have equal hashes. Sort-based (numpy's sort
    of 10M uint64 takes ~0.2 s; a hash table over 10M distinct keys takes seconds).
    """
    n = table.num_rows
    out = np.zeros(n, dtype=bool)
    if not complete.any():
        return out
    h = np.zeros(n, dtype=np.uint64)
    for name in schema.KEY_COLUMNS:
        h ^= _key_feature(table.column(name))
        h = _mix(h + _M1)
    h = h[complete]
    ordered = np.sort(h)
    repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    if repeated.size:
        out[complete] = pd.Series(h).isin(repeated).to_numpy()
    return out


def _row_masks(frame: pd.DataFrame, bounds: dict[str, Any]) -> dict[str, np.ndarray]:
    """Boolean mask per reason (except duplicate) over all rows, with GX's null semantics:
    a range rule only looks at non-null values."""
    ts = frame[schema.TIMESTAMP]
    rating = frame[schema.RATING]
    ts_present = ts.notna().to_numpy()
    rating_present = rating.notna().to_numpy()
    return {
        NULL_USER: frame[schema.USER].isna().to_numpy(),
        NULL_ITEM: frame[schema.ITEM].isna().to_numpy(),
        NULL_TIMESTAMP: ~ts_present,
        TIMESTAMP_BEFORE_MIN: ts_present & (ts < bounds["min_timestamp"]).to_numpy(dtype=bool, na_value=False),
        TIMESTAMP_IN_FUTURE: ts_present & (ts > bounds["max_timestamp"]).to_numpy(dtype=bool, na_value=False),
        NULL_RATING: ~rating_present,
        RATING_OUT_OF_RANGE: rating_present
        & ((rating < bounds["rating_min"]) | (rating > bounds["rating_max"])).to_numpy(dtype=bool, na_value=False),
    }


def _assign_reasons(frame: pd.DataFrame, masks: dict[str, np.ndarray], candidates: np.ndarray) -> tuple[np.ndarray, int]:
    """Reason code per row (0 = passes, i + 1 = REASONS[i]) and the GX-comparable duplicate count.

    Duplicates are looked for among the rows that pass every other rule, keeping the first, so
    a valid row is never dropped because an invalid copy of it came earlier.
    """
    n = len(frame)
    codes = np.zeros(n, dtype=np.int8)
    for i, reason in enumerate(REASONS[:-1]):
        codes[(codes == 0) & masks[reason]] = i + 1
    keys = list(schema.KEY_COLUMNS)
    # What GX counts: every member of a repeated key among complete rows (keep=False).
    all_duplicated = int(frame.loc[candidates, keys].duplicated(keep=False).sum()) if candidates.any() else 0
    eligible = candidates & (codes == 0)
    if eligible.any():
        positions = np.flatnonzero(eligible)
        later_copy = frame.loc[eligible, keys].duplicated(keep="first").to_numpy()
        codes[positions[later_copy]] = REASONS.index(DUPLICATE) + 1
    return codes, all_duplicated


# --------------------------------------------------------------------------- reporting


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


def _describe(result: Any) -> dict[str, Any]:
    config = result.expectation_config
    kwargs = {k: v for k, v in config.kwargs.items() if k not in ("batch_id", "column", "column_list")}
    body = result.result or {}
    exception = result.exception_info or {}
    entry = {
        "expectation": config.type,
        "check": (config.meta or {}).get("check"),
        "column": config.kwargs.get("column"),
        "columns": config.kwargs.get("column_list"),
        "kwargs": kwargs,
        "success": bool(result.success),
        "unexpected_count": body.get("unexpected_count"),
        "element_count": body.get("element_count"),
        "missing_count": body.get("missing_count"),
        "unexpected_percent": body.get("unexpected_percent"),
        "observed_value": body.get("observed_value"),
        "partial_unexpected_list": body.get("partial_unexpected_list"),
        "exception": exception.get("exception_message") if exception.get("raised_exception") else None,
    }
    return _jsonable(entry)


def _name(entry: dict[str, Any]) -> str:
    target = entry["column"] or (",".join(entry["columns"]) if entry["columns"] else None)
    return f"{entry['expectation']}({target})" if target else entry["expectation"]


def _batch_failure_message(entry: dict[str, Any], rows_in: int, min_rows: int) -> str:
    name = _name(entry)
    if entry["expectation"] == "expect_column_to_exist":
        return f"{name} failed: required column {entry['column']!r} is missing"
    if entry["expectation"] == "expect_table_row_count_to_be_between":
        return f"{name} failed: {rows_in} rows, validate.min_rows is {min_rows}"
    if entry["exception"]:
        return f"{name} failed: {entry['exception']}"
    expected = entry["kwargs"].get("type_list") or entry["kwargs"].get("type_")
    return f"{name} failed: observed {entry['observed_value']!r}, expected {expected!r}"


def _ensure_utc(moment: dt.datetime) -> dt.datetime:
    return moment.replace(tzinfo=dt.timezone.utc) if moment.tzinfo is None else moment


def _remove_stale(*paths: Path) -> None:
    for path in paths:
        if path.exists():
            logger.info("validate: removing the previous run's %s", path)
            path.unlink()


# --------------------------------------------------------------------------- the stage


def run_validate(cfg: ValidateConfig, layout: Layout, now: dt.datetime | None = None) -> ValidationResult:
    """Validate `layout.raw_interactions`; see the module docstring. Raises ValidationFailed."""
    started = time.perf_counter()
    timings: dict[str, float] = {}
    now = _ensure_utc(now or dt.datetime.now(dt.timezone.utc))
    bounds = {
        "min_timestamp": _ensure_utc(cfg.min_timestamp),
        "max_timestamp": now + dt.timedelta(seconds=cfg.future_tolerance_s),
        "rating_min": float(cfg.rating_min),
        "rating_max": float(cfg.rating_max),
    }
    source = layout.raw_interactions
    validated_path = layout.validated_interactions
    quarantine_path = layout.quarantine_dir / QUARANTINE_FILE
    summary_path = layout.reports_dir / SUMMARY_FILE
    docs_target = layout.reports_dir / DATA_DOCS_DIR
    # This run's outputs are all there is afterwards: never a previous run's beside a failure.
    _remove_stale(validated_path, quarantine_path)

    summary: dict[str, Any] = {
        "stage": STAGE,
        "success": False,
        "input": str(source),
        "validated_at": now.isoformat(),
        "thresholds": _jsonable(
            {
                "min_rows": cfg.min_rows,
                "min_timestamp": bounds["min_timestamp"],
                "now": now,
                "future_tolerance_s": cfg.future_tolerance_s,
                "max_timestamp": bounds["max_timestamp"],
                "rating_min": cfg.rating_min,
                "rating_max": cfg.rating_max,
                "max_quarantine_share": cfg.max_quarantine_share,
            }
        ),
        "gx_version": importlib.metadata.version("great_expectations"),
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
        "timings_s": timings,
    }

    def fail(failures: list[str], counts: str) -> ValidationFailed:
        """Write the summary (success false) and build the error that stops the stage."""
        summary["failures"] = failures
        timings["total"] = round(time.perf_counter() - started, 3)
        write_json(summary, summary_path)
        logger.error("validate: batch failed (%s); summary in %s", "; ".join(failures), summary_path)
        message = f"validation of {source} failed: " + "; ".join(failures) + f" [{counts}]; see {summary_path}"
        return ValidationFailed(message)

    # 1. read
    t0 = time.perf_counter()
    try:
        table = pq.read_table(source)
    except FileNotFoundError:
        summary["checks"] = [{"check": "readable_parquet", "success": False, "observed_value": "file not found"}]
        raise fail([f"check 'readable_parquet' failed: {source} does not exist (run the ingest stage first)"],
                   "rows_in=0") from None
    except (pa.ArrowException, OSError) as err:
        summary["checks"] = [{"check": "readable_parquet", "success": False, "observed_value": str(err)}]
        raise fail([f"check 'readable_parquet' failed: {source} is not a readable Parquet file ({err})"],
                   "rows_in=0") from None
    summary["checks"].append({"check": "readable_parquet", "success": True, "observed_value": None})
    rows_in = table.num_rows
    summary["rows_in"] = rows_in
    summary["schema"] = {f.name: str(f.type) for f in table.schema}
    summary["extra_columns"] = [c for c in table.column_names if c not in schema.RAW_COLUMNS]
    frame = _gx_frame(table)
    timings["read"] = round(time.perf_counter() - t0, 3)

    # 2. the row-level pre-filter column GX's compound-unique check is conditioned on
    t0 = time.perf_counter()
    present = set(frame.columns)
    keys_ok = set(schema.KEY_COLUMNS) <= present
    candidates = np.zeros(rows_in, dtype=bool)
    if keys_ok:
        complete = ~(frame[list(schema.KEY_COLUMNS)].isna().any(axis=1).to_numpy())
        try:
            candidates = _key_hash_repeated(table, complete)
        except TypeError:  # a key column of a type the type checks reject: the batch fails anyway
            candidates = complete.copy()
    frame[KEY_HASH_REPEATED] = candidates
    timings["key_prefilter"] = round(time.perf_counter() - t0, 3)

    # 3. GX
    t0 = time.perf_counter()
    batch_expectations, rules = _build_suite(bounds, cfg.min_rows, list(frame.columns))
    build_dir: Path | None = None
    if cfg.data_docs:
        layout.reports_dir.mkdir(parents=True, exist_ok=True)
        build_dir = Path(tempfile.mkdtemp(prefix=f".{DATA_DOCS_DIR}.", dir=layout.reports_dir))
        build_dir.chmod(0o755)  # mkdtemp's 0700 would follow the site once it is renamed into place
    try:
        context, results = _run_gx(frame, batch_expectations + [r.expectation for r in rules], build_dir)
        timings["gx"] = round(time.perf_counter() - t0, 3)
        expectations = [_describe(r) for r in results]
        summary["expectations"] = expectations
        docs_index: Path | None = None
        if build_dir is not None:
            t0 = time.perf_counter()
            docs_index = _build_data_docs(context, docs_target, build_dir)
            build_dir = None
            summary["outputs"]["data_docs"] = str(docs_index)
            timings["data_docs"] = round(time.perf_counter() - t0, 3)
    finally:
        if build_dir is not None:
            shutil.rmtree(build_dir, ignore_errors=True)

    # 4. batch-level expectations
    batch_entries = expectations[: len(batch_expectations)]
    rule_entries = expectations[len(batch_expectations) :]
    failed = [_batch_failure_message(e, rows_in, cfg.min_rows) for e in batch_entries if not e["success"]]
    if failed:
        raise fail(failed, f"rows_in={rows_in}")

    # 5. row-level masks, cross-checked against GX
    t0 = time.perf_counter()
    masks = _row_masks(frame, bounds)
    codes, all_duplicated = _assign_reasons(frame, masks, candidates)
    gx_counts_expected = {
        "not_null:user_id": int(masks[NULL_USER].sum()),
        "not_null:item_id": int(masks[NULL_ITEM].sum()),
        "not_null:timestamp": int(masks[NULL_TIMESTAMP].sum()),
        "range:timestamp": int((masks[TIMESTAMP_BEFORE_MIN] | masks[TIMESTAMP_IN_FUTURE]).sum()),
        "not_null:rating": int(masks[NULL_RATING].sum()),
        "range:rating": int(masks[RATING_OUT_OF_RANGE].sum()),
        "unique:user_id,item_id,timestamp": all_duplicated,
    }
    for rule, entry in zip(rules, rule_entries, strict=True):
        expected = gx_counts_expected[rule.check]
        if entry["exception"] or entry["unexpected_count"] != expected:
            raise ValidationCrossCheckError(
                f"{_name(entry)}: GX counts {entry['unexpected_count']} unexpected rows "
                f"(exception: {entry['exception']}), the pandas mask counts {expected}"
            )
        entry["mask_count"] = expected
    summary["rule_violations"] = {r: int(masks[r].sum()) for r in REASONS[:-1]} | {
        "duplicate_key_rows_incl_first": all_duplicated
    }
    counts_by_code = np.bincount(codes, minlength=len(REASONS) + 1)
    by_reason = {REASONS[i]: int(counts_by_code[i + 1]) for i in range(len(REASONS)) if counts_by_code[i + 1]}
    rows_passed = int(counts_by_code[0])
    rows_quarantined = int(counts_by_code[1:].sum())
    if rows_passed + rows_quarantined != rows_in:  # cannot happen; guards the invariant in code
        raise ValidationCrossCheckError(f"rows_in={rows_in} != passed {rows_passed} + quarantined {rows_quarantined}")
    share = rows_quarantined / rows_in if rows_in else 0.0
    summary.update(
        rows_passed=rows_passed,
        rows_quarantined=rows_quarantined,
        quarantine_share=share,
        rows_accounted_for=True,
        quarantined_by_reason=by_reason,
    )
    timings["masks"] = round(time.perf_counter() - t0, 3)

    # 6. quarantine (written on a share failure too: it is what a person needs to look at)
    t0 = time.perf_counter()
    bad = codes != 0
    bad_codes = codes[bad]
    quarantine = table.filter(pa.array(bad))
    reason = pa.DictionaryArray.from_arrays(
        pa.array(bad_codes.astype(np.int8) - 1, type=pa.int8()), pa.array(REASONS, type=pa.string())
    ).cast(pa.string())
    quarantine = quarantine.append_column(schema.QUARANTINE_REASON, reason)
    quarantine = quarantine.append_column(schema.QUARANTINE_STAGE, pa.repeat(pa.scalar(STAGE, pa.string()), len(bad_codes)))
    write_parquet(quarantine, quarantine_path)
    summary["outputs"]["quarantine"] = str(quarantine_path)
    timings["write_quarantine"] = round(time.perf_counter() - t0, 3)

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
        raise fail(
            [
                f"check 'max_quarantine_share' failed: {rows_quarantined} of {rows_in} rows quarantined "
                f"(share {share:.4f} > validate.max_quarantine_share {cfg.max_quarantine_share}); by reason {by_reason}"
            ],
            f"rows_in={rows_in}, rows_passed={rows_passed}, rows_quarantined={rows_quarantined}",
        )

    # 7. validated output
    t0 = time.perf_counter()
    write_parquet(table.filter(pa.array(~bad)), validated_path)
    summary["outputs"]["validated"] = str(validated_path)
    timings["write_validated"] = round(time.perf_counter() - t0, 3)
    summary["success"] = True
    timings["total"] = round(time.perf_counter() - started, 3)
    write_json(summary, summary_path)
    logger.info(
        "validate: %d rows in, %d passed, %d quarantined %s in %.1fs -> %s",
        rows_in, rows_passed, rows_quarantined, by_reason, timings["total"], validated_path,
    )
    return ValidationResult(
        rows_in=rows_in,
        rows_passed=rows_passed,
        rows_quarantined=rows_quarantined,
        quarantined_by_reason=by_reason,
        expectations=expectations,
        summary_path=summary_path,
        data_docs_path=docs_index,
    )
