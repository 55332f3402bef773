"""reports/summary.json: the run's headline figures, flat and few (DVC's one metrics file)."""

from __future__ import annotations

import json

import pytest

from pipeline.core.errors import EvaluateError
from pipeline.core.io import Layout, write_json
from pipeline.evaluation.summary import SUMMARY_REPORT, headline, write_summary

METRICS = {"split": "test", "models": {
    "sasrec": {"full/NDCG@10": 0.123456, "full/HR@10": 0.25, "full/MRR": 0.1, "sampled_uniform/NDCG@10": 0.5},
    "popularity": {"full/NDCG@10": 0.05, "full/HR@10": 0.1},
    "bpr": {"full/NDCG@10": 0.07, "full/HR@10": 0.14},
}}
COMPRESSION = {"teacher": "teacher", "models": {
    "teacher": {"ndcg@10": 0.1234, "hr@10": 0.25, "size_bytes": 400_000, "latency_p50_ms": 2.0, "ild@10": 0.4},
    "int8": {"ndcg@10": 0.1201, "hr@10": 0.24, "size_bytes": 110_000, "latency_p50_ms": 1.234567, "ild@10": 0.4},
}}


def _numbers(tree: dict) -> list:
    return [v for value in tree.values() for v in (_numbers(value) if isinstance(value, dict) else [value])]


def test_the_summary_holds_the_headline_figures_only():
    summary = headline(METRICS, COMPRESSION, "int8")
    assert summary == {
        "teacher": {"ndcg@10": 0.1235, "recall@10": 0.25},
        "popularity": {"ndcg@10": 0.05, "recall@10": 0.1},
        "bpr": {"ndcg@10": 0.07, "recall@10": 0.14},
        "chosen": {"variant": "int8", "ndcg@10": 0.1201, "recall@10": 0.24, "size_bytes": 110_000,
                   "latency_p50_ms": 1.2346},
    }
    assert len(_numbers(summary)) <= 16  # a dozen columns in `dvc exp show`, not hundreds


def test_write_summary_reads_the_evaluate_reports(tmp_path):
    layout = Layout(tmp_path)
    write_json(METRICS, layout.reports_dir / "metrics.json")
    write_json(COMPRESSION, layout.reports_dir / "compression.json")
    written = write_summary(layout, "teacher")
    assert json.loads((layout.reports_dir / SUMMARY_REPORT).read_text()) == written
    assert written["chosen"]["variant"] == "teacher" and written["chosen"]["size_bytes"] == 400_000


def test_a_chosen_model_missing_from_the_report_is_named(tmp_path):
    with pytest.raises(EvaluateError, match="'pruned' is not in compression.json"):
        headline(METRICS, COMPRESSION, "pruned")
    with pytest.raises(EvaluateError, match="run the evaluate stage first"):
        write_summary(Layout(tmp_path), None)


def test_without_the_metrics_report_the_teacher_comes_from_the_compression_report(tmp_path):
    layout = Layout(tmp_path)
    write_json(COMPRESSION, layout.reports_dir / "compression.json")
    assert write_summary(layout, "int8") == {"teacher": {"ndcg@10": 0.1234, "recall@10": 0.25},
                                             "chosen": headline(METRICS, COMPRESSION, "int8")["chosen"]}
