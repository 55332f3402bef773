"""`run_validate`: read, run the GX suite, stop on a batch-level failure, route rows, write outputs."""

from __future__ import annotations

import datetime as dt
import logging
import time

import numpy as np
import pyarrow as pa

from pipeline.core import schema
from pipeline.core.config import SparkConfig, ValidateConfig
from pipeline.core.io import Layout, write_parquet

from . import report, routing, rules, verdicts
from .frame import add_duplicate_candidates, gx_frame
from .outofcore import run_validate_out_of_core
from .run_state import QUARANTINE_FILE, RunState, ValidationResult, read_raw, utc

__all__ = ["QUARANTINE_FILE", "ValidationResult", "run_validate"]

logger = logging.getLogger(__name__)


def run_validate(cfg: ValidateConfig, layout: Layout, now: dt.datetime | None = None, engine: str = "pandas",
                 spark: SparkConfig | None = None) -> ValidationResult:
    """Validate `layout.raw_interactions` (see the package docstring); raises ValidationFailed.

    engine "duckdb" or "spark" (params `data_engine`; `spark`: params `spark`): the same outputs,
    the row rules in SQL (`outofcore`)."""
    if engine != "pandas":
        return run_validate_out_of_core(cfg, layout, now, engine, spark)
    run = RunState(cfg, layout, utc(now or dt.datetime.now(dt.UTC)))
    summary = run.summary
    # A run's outputs are what it wrote: no earlier run's file may sit beside a failed batch.
    run.remove_stale_outputs()

    # 1. read (Arrow keeps the exact input types for the outputs; pandas is what GX checks)
    t = time.perf_counter()
    table = read_raw(run)
    summary["checks"].append({"check": "readable_parquet", "success": True, "observed_value": None})
    rows_in = table.num_rows
    summary.update(
        rows_in=rows_in,
        schema={f.name: str(f.type) for f in table.schema},
        extra_columns=[c for c in table.column_names if c not in schema.RAW_COLUMNS],
    )
    t = run.lap("read_parquet", t)
    frame = gx_frame(table)
    t = run.lap("to_pandas", t)
    add_duplicate_candidates(table, frame)
    t = run.lap("duplicate_prefilter", t)

    # 2. GX: every verdict, batch-level and per row
    suite, results, entries, docs_index = verdicts.run_suite(run, frame, layout)
    t = time.perf_counter()

    # 3. batch-level expectations; a row rule GX could not evaluate cannot route rows either
    failed = verdicts.batch_failures(suite, entries, rows_in, cfg.min_rows)
    if failed:
        raise run.fail(failed, f"rows_in={rows_in}")

    # 4. route rows by the failing rows GX listed for each row rule
    failing: dict[str, np.ndarray] = {}
    for check, result, entry in zip(suite, results, entries, strict=True):
        if check.reason is not None:
            failing[check.reason] = routing.failing_rows(check, result, rows_in)
            report.add_examples(entry, check, frame, failing[check.reason])
    codes = routing.assign_reasons(frame, failing)
    per_code = np.bincount(codes, minlength=len(rules.REASONS) + 1)
    violations = {r: int(failing[r].size) for r in rules.REASONS}
    run.record_rows(per_code, violations)
    t = run.lap("route_rows", t)

    # 5. quarantine: written on a share failure too, it is what a person needs to look at
    bad = codes != 0
    write_parquet(routing.quarantine_table(table, codes), run.quarantine_path)
    summary["outputs"]["quarantine"] = str(run.quarantine_path)
    t = run.lap("write_quarantine", t)

    run.check_share()

    # 6. validated output
    write_parquet(table.filter(pa.array(~bad)), run.validated_path)
    summary["outputs"]["validated"] = str(run.validated_path)
    run.lap("write_validated", t)
    return run.finish(entries, docs_index)
