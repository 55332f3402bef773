"""The evaluate stage reports the beyond-accuracy metrics for the teacher, the baselines and every variant."""

import json

import pytest

from pipeline.compression.compress import run_compress
from pipeline.core.config import params_from_dict
from pipeline.evaluation.compression_report import REPORT_JSON, REPORT_MD
from pipeline.evaluation.evaluate import BEYOND_HEADLINE, METRICS_REPORT, run_evaluate
from pipeline.evaluation.metrics import BEYOND_ACCURACY
from pipeline.training.train import run_train
from tests.helpers import build_features

TINY = ["train.d_model=16", "train.n_heads=1", "train.n_layers=1", "train.max_len=20", "train.epochs=1",
        "train.num_threads=1", "train.baselines=[popularity,bpr]", "train.bpr.epochs=1", "tracking.enabled=false",
        "compress.variants=[fp32,int8]", "compress.latency_requests=10", "compress.throughput_batch_size=16",
        "evaluate.sampled_strategies=[]"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    layout = build_features(tmp_path_factory.mktemp("evaluate"))
    params = params_from_dict({}, TINY)
    run_train(params.train, params.tracking, layout, seed=0)
    run_compress(params.compress, layout, "main", seed=0)
    report = run_evaluate(params.evaluate, params.train, params.tracking, layout, seed=0, compress_cfg=params.compress)
    return layout, report


def test_metrics_report_has_diversity_and_novelty_for_every_model(evaluated):
    layout, report = evaluated
    on_disk = json.loads((layout.reports_dir / METRICS_REPORT).read_text())
    assert set(on_disk["models"]) == {"sasrec", "popularity", "bpr"}
    assert "teacher's item embedding table" in on_disk["item_vectors"]
    for name, metrics in on_disk["models"].items():
        for k in (10, 20, 50):
            for metric in BEYOND_ACCURACY:
                assert f"full/{metric}@{k}" in metrics, (name, metric, k)
        assert 0.0 <= metrics["full/Gini@10"] <= 1.0
        assert -1.0 <= 1 - metrics["full/ILD@10"] <= 1.0
        assert metrics["full/Novelty@10"] > 0
    # Popularity gives everybody (nearly) the same list: the least novel, the most concentrated exposure.
    models = on_disk["models"]
    assert models["popularity"]["full/Novelty@10"] < models["sasrec"]["full/Novelty@10"]
    assert models["popularity"]["full/Gini@10"] > models["sasrec"]["full/Gini@10"]
    table = (layout.reports_dir / "metrics.md").read_text()
    assert "## Diversity and novelty" in table and all(c.replace("full/", "") in table for c in BEYOND_HEADLINE)


def test_compression_report_has_diversity_and_novelty_for_every_variant(evaluated):
    layout, _ = evaluated
    report = json.loads((layout.reports_dir / REPORT_JSON).read_text())
    assert set(report["models"]) == {"teacher", "fp32", "int8"}
    for row in report["models"].values():
        assert {f"{metric.lower()}@10" for metric in BEYOND_ACCURACY} <= set(row)
    # fp32 holds the teacher's weights as they are: the same lists, the same figures.
    assert report["models"]["fp32"]["ild@10"] == pytest.approx(report["models"]["teacher"]["ild@10"])
    assert report["models"]["fp32"]["gini@10"] == pytest.approx(report["models"]["teacher"]["gini@10"])
    assert "| model | ILD@10 | Novelty@10 | Coverage@10 | Gini@10 |" in (layout.reports_dir / REPORT_MD).read_text()
