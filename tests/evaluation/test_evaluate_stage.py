"""The evaluate stage reports the beyond-accuracy metrics for the teacher, the baselines and every variant;
after train alone it reports what exists and names the variants not built, before scoring anything."""

import json
import logging
import re
import shutil

import pytest

from pipeline.compression.compress import compress_variant, run_compress
from pipeline.core.config import params_from_dict
from pipeline.core.errors import EvaluateError, PipelineError
from pipeline.core.io import Layout
from pipeline.evaluation.compression_report import REPORT_JSON, REPORT_MD, model_directories
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


@pytest.fixture(scope="module")
def trained_only(tmp_path_factory):
    """train, no compress: what a newcomer has when they run evaluate next."""
    layout = build_features(tmp_path_factory.mktemp("trained"))
    params = params_from_dict({}, TINY)
    run_train(params.train, params.tracking, layout, seed=0)
    return layout, params


def test_evaluate_after_train_alone_reports_the_teacher_and_names_the_missing_variants(trained_only, caplog):
    layout, params = trained_only
    with caplog.at_level(logging.INFO, logger="pipeline"):
        report = run_evaluate(params.evaluate, params.train, params.tracking, layout, seed=0, compress_cfg=params.compress)

    assert set(report["models"]) == {"sasrec", "popularity", "bpr"}
    on_disk = json.loads((layout.reports_dir / REPORT_JSON).read_text())
    assert set(on_disk["models"]) == {"teacher"} and on_disk["missing_variants"] == ["fp32", "int8"]
    assert "Not measured: compress.variants ['fp32', 'int8'] were not built" in (layout.reports_dir / REPORT_MD).read_text()
    messages = [record.getMessage() for record in caplog.records]
    warning = next(i for i, m in enumerate(messages) if "compress.variants ['fp32', 'int8'] are not built" in m)
    assert "run `python -m pipeline compress`" in messages[warning]
    first_scored = next(i for i, m in enumerate(messages) if m.startswith("1/3 sasrec ("))
    assert warning < first_scored  # said before any model is scored
    assert re.search(r"^1/3 sasrec \(\d+ users in \d+\.\d+s\)", messages[first_scored])  # per-model timing


def test_evaluate_measures_the_variants_that_exist(trained_only):
    layout, params = trained_only
    compress_variant(params.compress, layout, "main", "int8", seed=0)
    try:
        report = run_evaluate(params.evaluate, params.train, params.tracking, layout, seed=0, compress_cfg=params.compress)
    finally:
        shutil.rmtree(layout.model_dir("main") / "variants")
    assert set(report["compression"]["models"]) == {"teacher", "int8"}
    assert report["compression"]["missing_variants"] == ["fp32"]


def test_strict_variant_lookup_names_every_missing_file_and_the_command(trained_only):
    layout, params = trained_only
    with pytest.raises(PipelineError) as error:
        model_directories(params.compress, layout, "main")
    message = str(error.value)
    assert "['fp32', 'int8'] are not built" in message and "variants/<name>/variant.json for them" in message
    assert "python -m pipeline compress" in message


def test_evaluate_without_features_or_a_model_says_which_stage_to_run(tmp_path):
    params = params_from_dict({}, TINY)
    with pytest.raises(EvaluateError, match=r"sequences\.parquet not found: run the features and train stages first"):
        run_evaluate(params.evaluate, params.train, params.tracking, Layout(tmp_path / "empty"), seed=0,
                     compress_cfg=params.compress)
    layout = build_features(tmp_path / "features_only")
    with pytest.raises(EvaluateError, match=r"no trained model in .*: run the train stage first"):
        run_evaluate(params.evaluate, params.train, params.tracking, layout, seed=0, compress_cfg=params.compress)
