"""The state of one validate run, whichever engine: paths, the JSON summary being filled in, timings."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.config import ValidateConfig
from pipeline.core.errors import ValidationFailed
from pipeline.core.io import Layout, write_json

from . import report, routing, rules

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


def utc(moment: dt.datetime) -> dt.datetime:
    """Naive datetimes (e.g. an ISO string without offset in params.yaml) are read as UTC."""
    return moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment


class RunState:
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
            "min_timestamp": utc(cfg.min_timestamp),
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

    def remove_stale_outputs(self) -> None:
        """A run's outputs are what it wrote: no earlier run's file may sit beside a failed batch."""
        for stale in (self.validated_path, self.quarantine_path):
            if stale.exists():
                logger.debug("validate: removing the previous run's %s", stale)
                stale.unlink()

    def record_rows(self, per_code: np.ndarray, violations: dict[str, int]) -> None:
        """Row accounting from the rows per reason code (0 passed) and each row rule's own count."""
        rows_in = self.summary["rows_in"]
        rows_passed, rows_quarantined = int(per_code[0]), int(per_code[1:].sum())
        self.summary.update(
            rows_passed=rows_passed,
            rows_quarantined=rows_quarantined,
            quarantine_share=rows_quarantined / rows_in if rows_in else 0.0,
            rows_accounted_for=rows_passed + rows_quarantined == rows_in,  # one code per row: true by construction
            quarantined_by_reason={r: int(per_code[i + 1]) for i, r in enumerate(rules.REASONS) if per_code[i + 1]},
            # What each rule's GX expectation counts on its own; duplicate_key_rows counts every copy.
            rule_violations={r: violations[r] for r in rules.REASONS[:-1]} | {"duplicate_key_rows": violations[rules.DUPLICATE]},
        )

    @property
    def share_ok(self) -> bool:
        """Whether the quarantined share is within validate.max_quarantine_share (after record_rows)."""
        return self.summary["quarantine_share"] <= self.cfg.max_quarantine_share

    def check_share(self) -> None:
        """Fail the batch when the quarantined share exceeds validate.max_quarantine_share."""
        s, limit, share_ok = self.summary, self.cfg.max_quarantine_share, self.share_ok
        s["checks"].append({"check": "max_quarantine_share", "success": share_ok, "observed_value": s["quarantine_share"],
                            "threshold": limit})
        if not share_ok:
            raise self.fail(
                [
                    f"check 'max_quarantine_share' failed: {s['rows_quarantined']} of {s['rows_in']} rows quarantined, share "
                    f"{s['quarantine_share']:.4f} > validate.max_quarantine_share {limit} (by reason: {s['quarantined_by_reason']})"
                ],
                f"rows_in={s['rows_in']}, rows_passed={s['rows_passed']}, rows_quarantined={s['rows_quarantined']}",
            )

    def finish(self, entries: list[dict], docs_index: Path | None) -> ValidationResult:
        s = self.summary
        s["success"] = True
        self.write_summary()
        logger.info(
            "validate: %d rows in, %d passed, %d quarantined %s in %.1fs -> %s",
            s["rows_in"], s["rows_passed"], s["rows_quarantined"], s["quarantined_by_reason"], self.timings["total"],
            self.validated_path,
        )
        return ValidationResult(
            rows_in=s["rows_in"],
            rows_passed=s["rows_passed"],
            rows_quarantined=s["rows_quarantined"],
            quarantined_by_reason=s["quarantined_by_reason"],
            expectations=entries,
            summary_path=self.summary_path,
            data_docs_path=docs_index,
        )

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


def read_raw(run: RunState) -> pa.Table:
    try:
        return pq.read_table(run.source)
    except FileNotFoundError:
        problem = f"{run.source} does not exist (run the ingest stage first)"
    except (pa.ArrowException, OSError) as err:
        problem = f"{run.source} is not a readable Parquet file ({err})"
    run.summary["checks"].append({"check": "readable_parquet", "success": False, "observed_value": problem})
    raise run.fail([f"check 'readable_parquet' failed: {problem}"], "rows_in=0")
