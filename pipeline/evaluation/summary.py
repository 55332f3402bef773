"""reports/summary.json: the headline figures of a run, small enough for `dvc metrics show` and `dvc exp show`.

The full reports (reports/metrics.json: every metric of every model; reports/compression.json: every
variant's quality, size and serving cost) hold hundreds of numbers, nested; as DVC metrics they make
hundreds of columns. This summary holds a dozen flat numbers: the teacher's and the baselines'
test NDCG@10 and Recall@10, and the variant the registry policy chose (its NDCG@10, Recall@10, size
on disk and CPU latency). It is written after the register stage, which makes the choice.

Recall@10 is `full/HR@10`: one held-out item per user, so the hit rate at 10 is the recall at 10.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pipeline.core.errors import EvaluateError
from pipeline.core.io import Layout, write_json

logger = logging.getLogger(__name__)

SUMMARY_REPORT = "summary.json"
# The evaluate stage's reports (pipeline/evaluation/evaluate.py and compression_report.py take their names
# from here: this module imports nothing heavy, so the register stage reads them without torch).
METRICS_REPORT = "metrics.json"
COMPRESSION_REPORT = "compression.json"
# Rounded: the summary is for reading and diffing; the full reports keep every digit.
DIGITS = 4


def _read(path: Path) -> dict:
    if not path.exists():
        raise EvaluateError(f"{path} not found: run the evaluate stage first")
    return json.loads(path.read_text(encoding="utf-8"))


def headline(metrics_report: dict, compression_report: dict | None, chosen: str | None) -> dict[str, Any]:
    """The summary from the evaluate stage's reports and the name of the chosen variant (None: none chosen)."""
    summary: dict[str, Any] = {}
    for name, metrics in metrics_report.get("models", {}).items():
        # The trained model is the teacher of the compressed variants: one name in the summary.
        key = "teacher" if name == "sasrec" else name
        summary[key] = {"ndcg@10": round(metrics["full/NDCG@10"], DIGITS), "recall@10": round(metrics["full/HR@10"], DIGITS)}
    if chosen is not None:
        rows = (compression_report or {}).get("models", {})
        if chosen not in rows:
            raise EvaluateError(f"the chosen model {chosen!r} is not in {COMPRESSION_REPORT} (models: {sorted(rows)})")
        row = rows[chosen]
        summary["chosen"] = {
            "variant": chosen,
            "ndcg@10": round(row["ndcg@10"], DIGITS), "recall@10": round(row["hr@10"], DIGITS),
            "size_bytes": row["size_bytes"], "latency_p50_ms": round(row["latency_p50_ms"], DIGITS),
        }
    return summary


def write_summary(layout: Layout, chosen: str | None) -> dict[str, Any]:
    """reports/summary.json from reports/metrics.json and reports/compression.json; returns the summary.

    Without reports/metrics.json (a compression report made without the evaluate stage's metrics, as
    in a test or a benchmark: never in `dvc repro`, where it is a dependency), the teacher's figures
    come from the compression report and the baselines are left out; the registration stands.
    """
    compression = _read(layout.reports_dir / COMPRESSION_REPORT) if chosen is not None else None
    metrics_path = layout.reports_dir / METRICS_REPORT
    if metrics_path.exists() or compression is None:
        metrics = _read(metrics_path)
    else:
        logger.warning("%s not found: the summary has the teacher's figures from %s and no baselines",
                       metrics_path, COMPRESSION_REPORT)
        teacher = compression["models"].get(compression.get("teacher", "teacher"), {})
        metrics = {"models": {"sasrec": {"full/NDCG@10": teacher["ndcg@10"], "full/HR@10": teacher["hr@10"]}}
                   if teacher else {}}
    summary = headline(metrics, compression, chosen)
    write_json(summary, layout.reports_dir / SUMMARY_REPORT)
    return summary
