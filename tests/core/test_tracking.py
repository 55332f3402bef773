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
    for variable in ("DVC_STAGE", "AIRFLOW_CTX_DAG_ID"):  # as started from the CLI, whatever runs the tests
        monkeypatch.delenv(variable, raising=False)
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
    assert run.info.run_name == "train-main" and run.data.tags["leanrec.orchestrator"] == "cli"  # no DVC or Airflow here
    # The features' splits it read: training and validation by the train stage, test by evaluate.
    contexts = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset.name for i in run.inputs.dataset_inputs}
    assert contexts == {"training": "sequences.train", "validation": "sequences.valid", "test": "sequences.test"}
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


def test_runs_left_running_by_a_killed_process_are_marked_failed(tmp_path):
    """RUNNING runs of the name whose process (host, pid, start time) is gone end FAILED; the rest are left alone."""
    import os
    import socket
    import subprocess
    import sys

    from pipeline.core.tracking import PROCESS_TAGS, fail_orphaned_runs, process_tags

    cfg = params_from_dict({}, [f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]).tracking
    client = MlflowClient(cfg.tracking_uri)
    experiment = client.create_experiment("leanrec")
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()  # its pid now names no process (or, reused, one that started later)
    host = socket.gethostname()
    mine = process_tags()
    cases = {
        "killed": dict(zip(PROCESS_TAGS, (host, str(done.pid), "1.000"), strict=True)),
        "pid reused by another process": {**mine, PROCESS_TAGS[2]: "1.000"},
        "alive": mine,
        "other host": dict(zip(PROCESS_TAGS, ("elsewhere.invalid", str(done.pid), "1.000"), strict=True)),
        "no process tags": {},
    }
    runs = {case: client.create_run(experiment, run_name="train-main", tags=tags).info.run_id for case, tags in cases.items()}
    other_name = client.create_run(experiment, run_name="train-other", tags=cases["killed"]).info.run_id
    resumed = client.create_run(experiment, run_name="train-main", tags=cases["killed"]).info.run_id

    ended = fail_orphaned_runs(cfg, tmp_path, "train-main", keep=resumed)
    assert sorted(ended) == sorted([runs["killed"], runs["pid reused by another process"]])
    status = {case: client.get_run(run_id).info.status for case, run_id in runs.items()}
    assert status == {"killed": "FAILED", "pid reused by another process": "FAILED", "alive": "RUNNING",
                      "other host": "RUNNING", "no process tags": "RUNNING"}
    assert client.get_run(other_name).info.status == "RUNNING" and client.get_run(resumed).info.status == "RUNNING"
    assert os.getpid() == int(mine[PROCESS_TAGS[1]])
    assert fail_orphaned_runs(cfg, tmp_path, "train-main", keep=resumed) == []  # nothing left to end
    mlflow.set_tracking_uri(None)


def test_every_opened_run_records_its_process(tmp_path):
    from pipeline.core.tracking import PROCESS_TAGS, mlflow_run, process_tags

    cfg = params_from_dict({}, [f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]).tracking
    with mlflow_run(cfg, tmp_path, "train-main", system_metrics=False) as run:
        pass
    tags = MlflowClient(cfg.tracking_uri).get_run(run.info.run_id).data.tags
    assert {key: tags[key] for key in PROCESS_TAGS} == process_tags()
    mlflow.set_tracking_uri(None)


def test_only_a_run_that_did_not_finish_is_reopened_by_a_resumed_train(tmp_path):
    from pipeline.core.tracking import resumable_run_id

    cfg = params_from_dict({}, [f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]).tracking
    client = MlflowClient(cfg.tracking_uri)
    experiment = client.create_experiment("leanrec")
    killed, failed, finished, deleted = (client.create_run(experiment).info.run_id for _ in range(4))
    client.set_terminated(failed, "FAILED")
    client.set_terminated(finished, "FINISHED")  # its artifacts may back a registered version: never continued
    client.delete_run(deleted)
    assert [resumable_run_id(cfg, tmp_path, r) for r in (killed, failed, finished, deleted, "0" * 32, None)] == [
        killed, failed, None, None, None, None]


def test_the_experiment_opens_as_classic_machine_learning(tmp_path):
    """MLflow 3's UI opens an experiment without mlflow.experimentKind in its GenAI layout (no Models tab)."""
    from pipeline.core.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, mlflow_run

    cfg = params_from_dict({}, [f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]).tracking
    assert (EXPERIMENT_KIND_TAG, EXPERIMENT_KIND) == ("mlflow.experimentKind", "custom_model_development")
    client = MlflowClient(cfg.tracking_uri)
    with mlflow_run(cfg, tmp_path, "train-main", system_metrics=False):
        pass
    assert client.get_experiment_by_name("leanrec").tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    # An experiment created before the tag gets it; a kind someone chose is left as it is.
    untagged = client.create_experiment("older")
    chosen = client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    for name in ("older", "chosen"):
        with mlflow_run(cfg.model_copy(update={"experiment": name}), tmp_path, "train-main", system_metrics=False):
            pass
    assert client.get_experiment(untagged).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"
    mlflow.set_tracking_uri(None)


AIRFLOW_ENV = {"AIRFLOW_CTX_DAG_ID": "leanrec_train", "AIRFLOW_CTX_DAG_RUN_ID": "manual__2026-12-02T10:00:00+00:00",
               "AIRFLOW_CTX_TASK_ID": "train", "AIRFLOW_CTX_TRY_NUMBER": "1"}


def test_runs_say_which_orchestrator_started_them():
    from pipeline.core.tracking import orchestrated_run_name, orchestrator_tags

    airflow = orchestrator_tags(AIRFLOW_ENV)
    assert airflow == {"leanrec.orchestrator": "airflow", "leanrec.dag_id": "leanrec_train",
                       "leanrec.dag_run_id": "manual__2026-12-02T10:00:00+00:00", "leanrec.task_id": "train",
                       "leanrec.try_number": "1"}
    assert orchestrated_run_name("train-main", airflow) == "train-main-airflow-manual__2026-12-02T10:00:00+00:00"
    dvc = orchestrator_tags({"DVC_STAGE": "train", "DVC_ROOT": "/repo"})  # what `dvc repro` sets for a stage's command
    assert dvc == {"leanrec.orchestrator": "dvc", "leanrec.dvc_stage": "train"}
    assert orchestrated_run_name("train-main", dvc) == "train-main-dvc"
    experiment = orchestrator_tags({"DVC_STAGE": "train", "DVC_EXP_NAME": "lucid-gnat"})
    assert orchestrated_run_name("train-main", experiment) == "train-main-dvc-lucid-gnat"
    assert orchestrator_tags({"PATH": "/usr/bin"}) == {"leanrec.orchestrator": "cli"}
    assert orchestrated_run_name("train-main", orchestrator_tags({})) == "train-main"


def test_an_airflow_run_is_named_and_tagged_and_its_orphans_still_found(tmp_path, monkeypatch):
    from pipeline.core.tracking import PROCESS_TAGS, fail_orphaned_runs, mlflow_run

    cfg = params_from_dict({}, [f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]).tracking
    for key, value in AIRFLOW_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    with mlflow_run(cfg, tmp_path, "train-main", system_metrics=False) as run:
        pass
    client = MlflowClient(cfg.tracking_uri)
    created = client.get_run(run.info.run_id)
    assert created.info.run_name == f"train-main-airflow-{AIRFLOW_ENV['AIRFLOW_CTX_DAG_RUN_ID']}"
    tags = created.data.tags
    assert (tags["leanrec.orchestrator"], tags["leanrec.dag_id"], tags["leanrec.stage_run"]) == ("airflow", "leanrec_train", "train-main")
    # Re-opened by a later stage under DVC (evaluate logs to the training run): the run keeps its origin.
    for key in AIRFLOW_ENV:
        monkeypatch.delenv(key)
    monkeypatch.setenv("DVC_STAGE", "evaluate")
    with mlflow_run(cfg, tmp_path, "evaluate-main", run_id=run.info.run_id, system_metrics=False):
        pass
    assert client.get_run(run.info.run_id).data.tags["leanrec.orchestrator"] == "airflow"
    # A killed Airflow train is ended by the next train whatever orchestrator runs it (by leanrec.stage_run).
    killed = client.create_run(created.info.experiment_id, run_name=created.info.run_name,
                               tags={"leanrec.stage_run": "train-main", **dict(zip(PROCESS_TAGS, ("x", "1", "1.000"), strict=True))})
    import socket

    client.set_tag(killed.info.run_id, PROCESS_TAGS[0], socket.gethostname())
    client.set_tag(killed.info.run_id, PROCESS_TAGS[1], str(2**22 + 12345))  # above any pid the kernel hands out
    assert fail_orphaned_runs(cfg, tmp_path, "train-main") == [killed.info.run_id]
    mlflow.set_tracking_uri(None)


def test_a_features_split_is_logged_as_a_run_input_by_reference(tmp_path):
    import hashlib

    from pipeline.core.tracking import log_split_input, mlflow_run

    layout = build_features(tmp_path)
    path = layout.features_dir / "sequences.parquet"
    cfg = params_from_dict({}, [f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]).tracking
    with mlflow_run(cfg, tmp_path, "train-main", system_metrics=False) as run:
        log_split_input(path, "train")
        log_split_input(path, "valid")
    inputs = MlflowClient(cfg.tracking_uri).get_run(run.info.run_id).inputs.dataset_inputs
    by_context = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i for i in inputs}
    assert set(by_context) == {"training", "validation"}
    dataset = by_context["training"].dataset
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    assert dataset.name == "sequences.train" and dataset.digest == sha256[:36]
    assert json.loads(dataset.source) == {"uri": str(path.resolve())}
    columns = {c["name"]: c["type"] for c in json.loads(dataset.schema)["mlflow_colspec"]}
    assert columns["user_idx"] == "integer" and columns["n_train"] == "integer" and "items" in columns
    tags = {t.key: t.value for t in by_context["training"].tags}
    assert tags["leanrec.sha256"] == sha256 and int(tags["leanrec.rows"]) > 0 and tags["leanrec.split"] == "train"
    mlflow.set_tracking_uri(None)
