"""Running the GX suite over a frame (with its Data Docs) and reading its batch-level verdicts."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.core import schema
from pipeline.core.io import Layout

from . import report, rules, spark_gx
from .run_state import RunState


def run_suite(run: RunState, frame: pd.DataFrame, layout: Layout,
              spark_frame: Any = None) -> tuple[list[rules.Check], list[Any], list[dict], Path | None]:
    """The suite's checks, GX's result and summary entry for each, and the Data Docs index (None when off).

    With `spark_frame` (data_engine: spark) GX validates that Spark DataFrame, the type checks `frame` (`spark_gx`)."""
    t = time.perf_counter()
    rules.gx()
    t = run.lap("gx_import", t)  # once per process
    suite = rules.checks(run.bounds, run.cfg.min_rows, set(frame.columns))
    ranges = [c for c in (schema.TIMESTAMP, schema.RATING) if c in frame.columns]
    build_dir = report.new_site_dir(layout.reports_dir) if run.cfg.data_docs else None
    docs_index: Path | None = None
    try:
        # GX's column-map checks filter the *whole* batch frame on `notnull()` several times per
        # expectation, seconds when it holds string columns: the range checks get a narrow frame.
        if spark_frame is None:
            context, results = rules.run_gx({rules.SUITE_TABLE: frame, rules.SUITE_RANGES: frame[ranges]}, suite, build_dir)
        else:
            context, results = spark_gx.run_gx(frame, spark_frame, suite, build_dir)
        entries = [report.describe(c, r) for c, r in zip(suite, results, strict=True)]
        run.summary["expectations"] = entries
        t = run.lap("gx_validate", t)
        if build_dir is not None:
            docs_index = report.build_data_docs(context, build_dir, run.docs_target)
            build_dir = None
            run.summary["outputs"]["data_docs"] = str(docs_index)
            run.lap("gx_data_docs", t)
        else:
            report.data_docs_placeholder(layout.reports_dir, run.docs_target)
    finally:
        if build_dir is not None:
            shutil.rmtree(build_dir, ignore_errors=True)
    return suite, results, entries, docs_index


def batch_failures(suite: list[rules.Check], entries: list[dict], rows_in: int, min_rows: int) -> list[str]:
    """Failed batch-level expectations; else row rules GX could not evaluate (they cannot route rows)."""
    failed = [
        report.batch_failure(entry, rows_in, min_rows)
        for check, entry in zip(suite, entries, strict=True)
        if check.reason is None and not entry["success"]
    ]
    return failed or [
        report.batch_failure(entry, rows_in, min_rows)
        for check, entry in zip(suite, entries, strict=True)
        if check.reason is not None and entry["exception"]
    ]
