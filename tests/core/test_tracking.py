import json

import pytest
from mlflow.tracking import MlflowClient

import mlflow
from pipeline.core.config import params_from_dict
from pipeline.core.tracking import dvc_locked_hash, flatten, resolve_tracking_uri
from pipeline.evaluation.evaluate import run_evaluate
from pipeline.training.train import run_train
from tests.helpers import build_features

FAST = ["train.d_model=16", "train.n_heads=2", "train.n_layers=1", "train.max_len=20", "train.batch_size=64",
        "train.num_threads=1", "train.baselines=[popularity,bpr]", "train.bpr.epochs=2", "train.epochs=2"]


@pytest.mark.slow
def test_train_and_evaluate_log_to_a_temporary_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    layout = build_features(tmp_path)
    params = params_from_dict({}, FAST)
    uri = resolve_tracking_uri(params.tracking, layout.root)
    assert uri == f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"

    result = run_train(params.train, params.tracking, layout, seed=params.seed)
    report = run_evaluate(params.evaluate, params.train, params.tracking, layout, seed=params.seed)
    assert set(report["models"]) == {"sasrec", "popularity", "bpr"}
    assert json.loads((layout.reports_dir / "metrics.json").read_text())["models"]["sasrec"]["users"] > 0

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.data.params["train.model"] == "sasrec"
    assert run.data.params["model.d_model"] == "16"
    assert len(client.get_metric_history(run.info.run_id, "valid_ndcg10")) == 2
    assert len(client.get_metric_history(run.info.run_id, "tokens_per_s")) == 2
    assert "test.sasrec.full/NDCG_at_10" in run.data.metrics
    assert "test.popularity.full/NDCG_at_10" in run.data.metrics
    assert run.data.tags["mlflow.source.git.commit"]
    assert len(run.data.tags["leanrec.features.sha256"]) == 64
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert "model/model.safetensors" in artifacts and "model/model_config.json" in artifacts
    config = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/config.json")
    assert config["train"]["d_model"] == 16 and config["model"]["n_items"] > 0
    # Artifacts of the embedded store live inside the work dir.
    assert (tmp_path / "mlartifacts").is_dir()
    mlflow.set_tracking_uri(None)


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    params = params_from_dict({})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(params.tracking, tmp_path) == "http://127.0.0.1:5000"
    explicit = params_from_dict({"tracking": {"tracking_uri": "sqlite:////tmp/x.db"}})
    assert resolve_tracking_uri(explicit.tracking, tmp_path) == "sqlite:////tmp/x.db"


def test_flatten_and_dvc_lock_hash(tmp_path):
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  features:\n    cmd: x\n    outs:\n    - path: data/features\n      md5: abc.dir\n"
    )
    assert dvc_locked_hash(tmp_path, "data/features") == "abc.dir"
    assert dvc_locked_hash(tmp_path, "data/other") is None
