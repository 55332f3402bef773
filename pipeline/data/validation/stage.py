"""`run_validate`: read, run the GX suite, stop on a batch-level failure, route rows, write outputs."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core import schema
from pipeline.core.config import ValidateConfig
from pipeline.core.errors import ValidationFailed
from pipeline.core.io import Layout, write_json, write_parquet

from . import report, routing, rules
from .frame import add_duplicate_candidates, gx_frame

logger = logging.getLogger(__name__)

QUARANTINE_FILE = "validate.parquet"


@dataclass
class ValidationResult:
    rows_in: int
    rows_passed: int
    rows_quarantined: int
    quarantined_by_reason: dict[str, int]
    expectations: list[dict]  # one per GX expectation, in suite order (see `report.describe`)
    summary_path: Path
    data_docs_path: Path | None


def _utc(moment: dt.datetime) -> dt.datetime:
    """Naive datetimes (e.g. an ISO string without offset in params.yaml) are read as UTC."""
    return moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment


class _Run:
    """State of one run: paths, the summary being filled in, timings."""

    def __init__(self, cfg: ValidateConfig, layout: Layout, now: dt.datetime) -> None:
        self.cfg = cfg
        self.started = time.perf_counter()
        self.source = layout.raw_interactions
        self.validated_path = layout.validated_interactions
        self.quarantine_path = layout.quarantine_dir / QUARANTINE_FILE
        self.summary_path = layout.reports_dir / report.SUMMARY_FILE
        self.docs_target = layout.reports_dir / report.DATA_DOCS_DIR
        self.bounds = {
            "min_timestamp": _utc(cfg.min_timestamp),
            "max_timestamp": now + dt.timedelta(seconds=cfg.future_tolerance_s),
            "rating_min": float(cfg.rating_min),
            "rating_max": float(cfg.rating_max),
        }
        self.timings: dict[str, float] = {}
        self.summary: dict[str, Any] = {
            "stage": routing.STAGE,
            "success": False,
            "input": str(self.source),
            "validated_at": now.isoformat(),
            "gx_version": importlib.metadata.version("great_expectations"),
            "thresholds": report.jsonable(
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
    """Validate `layout.raw_interactions` (see the package docstring); raises ValidationFailed."""
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
    frame = gx_frame(table)
    t = run.lap("to_pandas", t)
    add_duplicate_candidates(table, frame)
    t = run.lap("duplicate_prefilter", t)

    # 2. GX: every verdict, batch-level and per row
    rules.gx()
    t = run.lap("gx_import", t)  # once per process
    suite = rules.checks(run.bounds, cfg.min_rows, set(frame.columns))
    ranges = [c for c in (schema.TIMESTAMP, schema.RATING) if c in frame.columns]
    build_dir = report.new_site_dir(layout.reports_dir) if cfg.data_docs else None
    docs_index: Path | None = None
    try:
        # GX's column-map checks filter the *whole* batch frame on `notnull()` several times per
        # expectation, seconds when it holds string columns: the range checks get a narrow frame.
        context, results = rules.run_gx({rules.SUITE_TABLE: frame, rules.SUITE_RANGES: frame[ranges]}, suite, build_dir)
        entries = [report.describe(c, r) for c, r in zip(suite, results, strict=True)]
        summary["expectations"] = entries
        t = run.lap("gx_validate", t)
        if build_dir is not None:
            docs_index = report.build_data_docs(context, build_dir, run.docs_target)
            build_dir = None
            summary["outputs"]["data_docs"] = str(docs_index)
            t = run.lap("gx_data_docs", t)
        else:
            report.data_docs_placeholder(layout.reports_dir, run.docs_target)
    finally:
        if build_dir is not None:
            shutil.rmtree(build_dir, ignore_errors=True)

    # 3. batch-level expectations; a row rule GX could not evaluate cannot route rows either
    failed = [
        report.batch_failure(entry, rows_in, cfg.min_rows)
        for check, entry in zip(suite, entries, strict=True)
        if check.reason is None and not entry["success"]
    ]
    failed = failed or [
        report.batch_failure(entry, rows_in, cfg.min_rows)
        for check, entry in zip(suite, entries, strict=True)
        if check.reason is not None and entry["exception"]
    ]
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
    by_reason = {reason: int(per_code[i + 1]) for i, reason in enumerate(rules.REASONS) if per_code[i + 1]}
    rows_passed = int(per_code[0])
    rows_quarantined = int(per_code[1:].sum())
    share = rows_quarantined / rows_in if rows_in else 0.0
    summary.update(
        rows_passed=rows_passed,
        rows_quarantined=rows_quarantined,
        quarantine_share=share,
        rows_accounted_for=rows_passed + rows_quarantined == rows_in,  # one code per row: true by construction
        quarantined_by_reason=by_reason,
        # What each rule's GX expectation counts on its own; duplicate_key_rows counts every copy.
        rule_violations={r: int(failing[r].size) for r in rules.REASONS[:-1]}
        | {"duplicate_key_rows": int(failing[rules.DUPLICATE].size)},
    )
    t = run.lap("route_rows", t)

    # 5. quarantine: written on a share failure too, it is what a person needs to look at
    bad = codes != 0
    write_parquet(routing.quarantine_table(table, codes), run.quarantine_path)
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

    # 6. validated output
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
