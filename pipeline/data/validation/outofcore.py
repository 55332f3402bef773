"""`run_validate_out_of_core` (data_engine: duckdb or spark): the same stage, the row work in SQL.

* duckdb: GX runs over the first `SAMPLE_ROWS` rows (all of them when the input is smaller): the
  column and type checks (one Arrow type per column, so the sample decides them for the file),
  and the Data Docs. The row-count check is decided on the whole file from its expectation's
  bounds. The summary's `gx_sample` says how many rows GX saw.
* spark: GX validates the Spark DataFrame of the whole input (`spark_gx`): every check but the
  type checks, which still run on the first rows (`gx_spark`, `gx_sample` and each entry's
  `gx_data` say which ran where); the Data Docs come from those results.
* The row rules run over every row in DuckDB (bounded memory) or Spark, as SQL derived from the
  same GX expectations (`sql_rules`, `sql_engine`). When GX saw the whole input, its counts must
  equal the engine's, or the stage stops (on spark always).
* Rows are routed as `routing.assign_reasons` does (first rule broken; of repeated keys among rows
  breaking no other rule the first copy stays) and streamed batch by batch into the same two
  files, in input order, with the input's exact types.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core import schema
from pipeline.core.config import SparkConfig, ValidateConfig
from pipeline.core.io import Layout, parquet_stream
from pipeline.data import sql_engine
from pipeline.data.sql_engine import SqlEngine

from . import report, routing, rules, spark_gx, sql_rules, verdicts
from .frame import add_duplicate_candidates, gx_frame
from .run_state import RunState, ValidationResult, read_raw, utc

logger = logging.getLogger(__name__)

SAMPLE_ROWS = 200_000  # rows GX sees (type checks, Data Docs): the first ones of the file


def _sample(run: RunState) -> tuple[pq.ParquetFile, pa.Table]:
    """The open file and its first SAMPLE_ROWS rows; an unreadable file fails the batch as `read_raw` does."""
    try:
        parquet = pq.ParquetFile(run.source)
        batch = next(parquet.iter_batches(batch_size=SAMPLE_ROWS), None)
    except (FileNotFoundError, pa.ArrowException, OSError):
        read_raw(run)  # raises the stage's own error for this file
        raise
    sample = pa.Table.from_batches([batch] if batch is not None else [], schema=parquet.schema_arrow)
    return parquet, sample


def _rule_counts(con: SqlEngine, source: str, rows: sql_rules.RowRules,
                 types: dict[str, pa.DataType]) -> tuple[dict[str, int], np.ndarray, np.ndarray]:
    """Each row rule's own count, the rows per routing code before duplicates (`per_code`), and the rows
    routed as duplicates (file row numbers, sorted). The counts and the codes come from one scan."""
    counts = {r: 0 for r in rules.REASONS}
    per_code = np.zeros(len(rules.REASONS) + 1, dtype=np.int64)
    filters = "".join(f", count(*) FILTER (WHERE {sql})" for sql in rows.predicates.values())
    for code, rows_with_code, *broken in con.rows(f"SELECT {rows.code()} AS code, count(*){filters} FROM {source} GROUP BY code"):
        per_code[code] += rows_with_code
        for reason, n in zip(rows.predicates, broken, strict=True):
            counts[reason] += n
    if rows.key is None:
        return counts, per_code, np.zeros(0, dtype=np.int64)
    keys = ", ".join(sql_rules.quote(c) for c in rows.key.columns)
    con.materialize("repeated_keys", f"""
        SELECT {keys}, count(*) AS copies,
               min(file_row_number) FILTER (WHERE {rows.code()} = 0) AS kept_copy
        FROM {source} WHERE {rows.key.complete(types)} GROUP BY ALL HAVING count(*) > 1""")
    counts[rules.DUPLICATE] = int(con.rows("SELECT coalesce(sum(copies), 0) FROM repeated_keys")[0][0])
    duplicates = con.arrow(f"""
        SELECT file_row_number FROM {source} JOIN repeated_keys USING ({keys})
        WHERE {rows.code()} = 0 AND file_row_number <> kept_copy""").column("file_row_number").to_numpy()
    return counts, per_code, np.sort(np.asarray(duplicates, dtype=np.int64))


def _examples(con: SqlEngine, source: str, check: rules.Check, where: str, entry: dict, count: int) -> None:
    if count == 0:  # nothing to show: no scan for it
        report.set_examples(entry, check, np.zeros(0, dtype=np.int64), pd.DataFrame(columns=list(check.columns)))
        return
    columns = ", ".join(sql_rules.quote(c) for c in check.columns)
    shown = con.arrow(f"SELECT file_row_number, {columns} FROM {source} WHERE {where} "
                      f"ORDER BY file_row_number LIMIT {report.EXAMPLES}").to_pandas()
    report.set_examples(entry, check, shown["file_row_number"].to_numpy(), shown[list(check.columns)])


def _full_counts(entry: dict, check: rules.Check, count: int, rows_in: int, whole: bool, engine: str) -> None:
    """The summary entry of a row rule with the SQL engine's count over every row."""
    if whole:
        if entry["unexpected_count"] != count:
            raise RuntimeError(f"{check.name}: GX counts {entry['unexpected_count']} failing rows, the SQL derived from it "
                               f"{count}: sql_rules no longer matches GX")
        return
    entry.update(success=count == 0, unexpected_count=count, element_count=rows_in,
                 unexpected_percent=100.0 * count / rows_in if rows_in else 0.0,
                 note=f"counted by {engine} over all {rows_in} rows (SQL derived from this expectation); "
                 f"GX saw the first {SAMPLE_ROWS} rows")


def _write_outputs(con: SqlEngine, run: RunState, parquet: pq.ParquetFile, rows: sql_rules.RowRules, duplicates: np.ndarray) -> None:
    """One pass over the input: the quarantine always (a person needs it on a share failure too),
    the validated rows only when the share check passes."""
    share_ok = run.share_ok
    duplicate_code = rules.REASONS.index(rules.DUPLICATE) + 1
    quarantine_schema = routing.quarantine_table(parquet.schema_arrow.empty_table(), np.zeros(0, np.int8)).schema
    first = 0
    with (parquet_stream(run.quarantine_path, quarantine_schema) as quarantine,
          parquet_stream(run.validated_path, parquet.schema_arrow) if share_ok else contextlib.nullcontext() as validated):
        for batch in parquet.iter_batches(batch_size=sql_engine.BATCH_ROWS):
            batch_table = pa.Table.from_batches([batch])
            con.register("batch_table", batch_table)
            codes = con.arrow(f"SELECT {rows.code()} AS code FROM batch_table").column("code").to_numpy()
            codes = codes.astype(np.int8)  # a writable copy: Arrow's buffer is read-only
            lo, hi = np.searchsorted(duplicates, [first, first + batch_table.num_rows])
            codes[duplicates[lo:hi] - first] = duplicate_code
            quarantine.write_table(routing.quarantine_table(batch_table, codes))
            if validated is not None:
                validated.write_table(batch_table.filter(pa.array(codes == 0)))
            first += batch_table.num_rows
    run.summary["outputs"]["quarantine"] = str(run.quarantine_path)
    run.check_share()
    run.summary["outputs"]["validated"] = str(run.validated_path)


def _describe_gx(run: RunState, entries: list[dict], suite: list[rules.Check], sample_rows: int, rows_in: int) -> None:
    """Spark: which checks GX ran on the Spark DataFrame (all rows) and which on the pandas sample."""
    on_spark = [spark_gx.on_spark(c) for c in suite]
    run.summary["gx_spark"] = {"rows": rows_in, "whole_input": True, "checks": [c.name for c, s in zip(suite, on_spark, strict=True) if s],
                               "result_format": spark_gx.RESULT_FORMAT["result_format"]}
    run.summary["gx_sample"].update(
        checks=[c.name for c, s in zip(suite, on_spark, strict=True) if not s],
        note="GX's type expectations name pandas dtypes, which its Spark data source does not recognise: they ran on "
        "GX's pandas source over the first rows (a Parquet column has one type in the whole file); every other "
        "expectation ran on the Spark DataFrame, all rows (gx_spark)")
    for check, entry, spark in zip(suite, entries, on_spark, strict=True):
        entry["gx_data"] = {"engine": "spark", "rows": rows_in} if spark else {"engine": "pandas", "rows": sample_rows}
        if spark and check.reason is not None and rows_in == 0 and entry["unexpected_count"] is None:
            entry["unexpected_count"] = 0  # GX on Spark reports no count, not zero, for an empty DataFrame
        if check.reason == rules.DUPLICATE:
            entry["note"] = (f"on Spark {rules.KEY_HASH_REPEATED} is true for every row whose three keys are present "
                             "(no pre-filter), so element_count counts those rows")


def run_validate_out_of_core(cfg: ValidateConfig, layout: Layout, now: dt.datetime | None = None, engine: str = "duckdb",
                             spark: SparkConfig | None = None) -> ValidationResult:
    run = RunState(cfg, layout, utc(now or dt.datetime.now(dt.UTC)))
    run.remove_stale_outputs()
    t = time.perf_counter()
    parquet, sample = _sample(run)
    rows_in = parquet.metadata.num_rows
    arrow_schema = parquet.schema_arrow
    on_spark = engine == "spark"
    whole = sample.num_rows == rows_in or on_spark  # whether GX's row-rule counts cover every row
    run.summary["checks"].append({"check": "readable_parquet", "success": True, "observed_value": None})
    run.summary.update(
        rows_in=rows_in,
        schema={f.name: str(f.type) for f in arrow_schema},
        extra_columns=[c for c in arrow_schema.names if c not in schema.RAW_COLUMNS],
        engine=engine,
        gx_sample={"rows": sample.num_rows, "of": rows_in, "whole_input": sample.num_rows == rows_in,
                   "note": f"GX (type checks, Data Docs) ran on the first rows; every row rule ran on all rows in {engine}"},
    )
    frame = gx_frame(sample)
    add_duplicate_candidates(sample, frame)
    t = run.lap("read_sample", t)

    types = {f.name: f.type for f in arrow_schema}
    with sql_engine.connect(engine, layout.root / "data", spark) as con:
        source = "source"
        con.parquet(source, run.source)
        spark_frame = con.dataframe(spark_gx.frame_sql(types, source)) if on_spark else None  # type: ignore[attr-defined]
        suite, _, entries, docs_index = verdicts.run_suite(run, frame, layout, spark_frame)
        if on_spark:
            _describe_gx(run, entries, suite, sample.num_rows, rows_in)
        t = time.perf_counter()
        for check, entry in zip(suite, entries, strict=True):
            if check.reason is None and not whole and type(check.expectation).__name__ == "ExpectTableRowCountToBeBetween":
                entry.update(success=sql_rules.row_count_within(check.expectation, rows_in), observed_value=rows_in,
                             note=f"decided on all {rows_in} rows from this expectation's bounds; GX saw {sample.num_rows}")
        failed = verdicts.batch_failures(suite, entries, rows_in, cfg.min_rows)
        if failed:
            raise run.fail(failed, f"rows_in={rows_in}")

        row_rules = sql_rules.row_rules(suite, types, con.dialect)
        keys = ", ".join(sql_rules.quote(c) for c in row_rules.key.columns) if row_rules.key else ""
        counts, per_code, duplicates = _rule_counts(con, source, row_rules, types)
        t = run.lap(f"{engine}_rules", t)
        per_code[0] -= duplicates.size
        per_code[rules.REASONS.index(rules.DUPLICATE) + 1] = duplicates.size
        for check, entry in zip(suite, entries, strict=True):
            if check.reason is None:
                continue
            _full_counts(entry, check, counts[check.reason], rows_in, whole, engine)
            where = (row_rules.predicates[check.reason] if check.reason != rules.DUPLICATE else
                     f"file_row_number IN (SELECT file_row_number FROM {source} JOIN repeated_keys USING ({keys}))")
            _examples(con, source, check, where, entry, counts[check.reason])
        run.record_rows(per_code, counts)
        t = run.lap("route_rows", t)
        _write_outputs(con, run, parquet, row_rules, duplicates)
        run.lap("write_outputs", t)
    return run.finish(entries, docs_index)
