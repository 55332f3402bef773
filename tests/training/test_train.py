import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.core.config import params_from_dict
from pipeline.core.errors import TrainError
from pipeline.core.tracking import read_run_id
from pipeline.training.losses import resolve_loss
from pipeline.training.train import CHECKPOINT_FILE, curriculum_len, run_train
from tests.helpers import build_features, copy_features

ROOT = Path(__file__).resolve().parents[2]
FAST = ["train.d_model=16", "train.n_heads=2", "train.n_layers=1", "train.max_len=20", "train.batch_size=32",
        "train.num_threads=1", "train.baselines=[popularity]"]


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return build_features(tmp_path_factory.mktemp("features"))


def _params(*overrides):
    return params_from_dict({}, [*FAST, "tracking.enabled=false", *overrides])


def _cli(workdir: Path, *overrides: str, resume: bool = False, launcher: list[str] | None = None) -> list[str]:
    args = [*(launcher or [sys.executable]), "-m", "pipeline", "train", "--workdir", str(workdir)]
    for o in [*FAST, "tracking.enabled=false", *overrides]:
        args += ["-S", o]
    return args + (["--resume"] if resume else [])


def test_training_improves_on_untrained_model_and_keeps_best(features, tmp_path):
    layout = copy_features(features, tmp_path)
    p = _params("train.epochs=4", "train.early_stopping_patience=10")
    result = run_train(p.train, p.tracking, layout, seed=1)
    history = result.history
    assert len(history) == 4
    assert history[-1]["loss"] < history[0]["loss"]
    best = max(h["valid_ndcg10"] for h in history)
    assert result.best_valid_ndcg10 == pytest.approx(best)
    for key in ("sequences_per_s", "tokens_per_s", "peak_memory_mib"):
        assert history[0][key] > 0
    run_dir = Path(result.run_dir)
    assert (run_dir / "model.safetensors").exists() and (run_dir / "baselines" / "popularity.safetensors").exists()
    # Checkpoints hold tensors and plain values only: they load with weights_only=True.
    checkpoint = torch.load(run_dir / CHECKPOINT_FILE, weights_only=True)
    assert checkpoint["epoch"] == 3 and not checkpoint["stopped_early"]


def test_early_stopping(features, tmp_path):
    layout = copy_features(features, tmp_path)
    p = _params("train.epochs=50", "train.early_stopping_patience=1", "train.lr=0.05")
    result = run_train(p.train, p.tracking, layout, seed=1)
    assert result.epochs_run < 50
    assert result.epochs_run == result.best_epoch + 2  # one epoch without improvement, then stop


def test_cpu_training_is_deterministic(features, tmp_path):
    runs = []
    for name in ("a", "b"):
        layout = copy_features(features, tmp_path / name)
        p = _params("train.epochs=2")
        runs.append(load_file(str(Path(run_train(p.train, p.tracking, layout, seed=3).run_dir) / "model.safetensors")))
    for key in runs[0]:
        torch.testing.assert_close(runs[0][key], runs[1][key], rtol=0, atol=0)


def test_sampled_softmax_trains(features, tmp_path):
    layout = copy_features(features, tmp_path)
    p = _params("train.epochs=3", "train.loss=sampled_softmax", "train.n_negatives=20", "train.early_stopping_patience=10")
    result = run_train(p.train, p.tracking, layout, seed=1)
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_chunked_softmax_trains_to_the_same_model_as_the_full_softmax(features, tmp_path):
    """Same loss, same gradients: two epochs with each end within float rounding of one another."""
    weights = {}
    for loss in ("full_softmax", "chunked_softmax"):
        layout = copy_features(features, tmp_path / loss)
        p = _params("train.epochs=2", f"train.loss={loss}", "train.loss_block_logits=7")  # one token per block
        result = run_train(p.train, p.tracking, layout, seed=5)
        weights[loss] = (result.history, load_file(str(Path(result.run_dir) / "model.safetensors")))
    (dense_history, dense), (chunked_history, chunked) = weights["full_softmax"], weights["chunked_softmax"]
    assert [r["loss"] for r in chunked_history] == pytest.approx([r["loss"] for r in dense_history], rel=1e-4)
    for key in dense:
        torch.testing.assert_close(chunked[key], dense[key], rtol=1e-3, atol=1e-4)


def test_curriculum_grows_sequence_length():
    p = params_from_dict({}, ["train.curriculum.enabled=true", "train.curriculum.start_len=10", "train.curriculum.epochs=4"])
    assert [curriculum_len(p.train, 50, e) for e in range(6)] == [10, 20, 30, 40, 50, 50]
    off = params_from_dict({})
    assert curriculum_len(off.train, 50, 0) == 50


def _train_and_kill(layout, overrides: list[str]):
    """Start the train CLI, SIGKILL it once a checkpoint of epoch 1 or later exists; the checkpoint's path."""
    proc = subprocess.Popen(_cli(layout.root, *overrides), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = layout.model_dir("main") / CHECKPOINT_FILE
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if checkpoint.exists() and torch.load(checkpoint, weights_only=True)["epoch"] >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)  # a real kill: no cleanup, no atexit
    proc.wait()
    return checkpoint


@pytest.mark.slow
def test_resume_after_kill_ends_where_an_uninterrupted_run_would(features, tmp_path):
    overrides = ["train.epochs=6", "train.early_stopping_patience=10", "train.d_model=32"]
    straight = copy_features(features, tmp_path / "straight")
    subprocess.run(_cli(straight.root, *overrides), check=True, capture_output=True, cwd=ROOT, timeout=600)

    killed = copy_features(features, tmp_path / "killed")
    checkpoint = _train_and_kill(killed, overrides)
    killed_at = torch.load(checkpoint, weights_only=True)["epoch"]
    assert killed_at < 5

    subprocess.run(_cli(killed.root, *overrides, resume=True), check=True, capture_output=True, cwd=ROOT, timeout=600)
    a = load_file(str(straight.model_dir("main") / "model.safetensors"))
    b = load_file(str(killed.model_dir("main") / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    history_a = json.loads((straight.model_dir("main") / "history.json").read_text())
    history_b = json.loads((killed.model_dir("main") / "history.json").read_text())
    assert [h["valid_ndcg10"] for h in history_a] == [h["valid_ndcg10"] for h in history_b]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_matches_single_process(features, tmp_path):
    overrides = ["train.epochs=2", "train.dropout=0.0", "train.early_stopping_patience=10", "train.batch_size=32"]
    single = copy_features(features, tmp_path / "single")
    subprocess.run(_cli(single.root, *overrides), check=True, capture_output=True, cwd=ROOT, timeout=600)

    ddp = copy_features(features, tmp_path / "ddp")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                "--master_addr=127.0.0.1", f"--master_port={_free_port()}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(_cli(ddp.root, *overrides, launcher=launcher), capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world=2" in proc.stderr
    a = load_file(str(single.model_dir("main") / "model.safetensors"))
    b = load_file(str(ddp.model_dir("main") / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4)


def test_fresh_run_discards_an_older_checkpoint_and_baselines(features, tmp_path):
    layout = copy_features(features, tmp_path)
    first = _params("train.epochs=3", "train.early_stopping_patience=10", "train.baselines=[popularity,bpr]", "train.bpr.epochs=1")
    run_train(first.train, first.tracking, layout, seed=1)
    run_dir = layout.model_dir("main")
    assert (run_dir / "baselines" / "bpr.safetensors").exists()
    (run_dir / "run.json").write_text('{"mlflow_run_id": "stale"}')  # as if an earlier run was tracked
    second = _params("train.epochs=1")  # FAST keeps popularity only
    result = run_train(second.train, second.tracking, layout, seed=1)
    assert result.mlflow_run_id is None and read_run_id(run_dir) is None
    assert torch.load(run_dir / CHECKPOINT_FILE, weights_only=True)["epoch"] == 0
    assert not (run_dir / "baselines" / "bpr.safetensors").exists()


def test_resolve_loss_picks_chunked_softmax_above_the_threshold_only():
    assert resolve_loss("auto", 50_000, 50_000, None) == "full_softmax"
    assert resolve_loss("auto", 50_001, 50_000, None) == "chunked_softmax"  # null: never sampled
    assert resolve_loss("auto", 50_001, 50_000, 50_001) == "chunked_softmax"  # at the sampled threshold, not above it


def test_resolve_loss_picks_sampled_softmax_above_its_own_threshold_only():
    assert resolve_loss("auto", 200_000, 1_000, 200_000) == "chunked_softmax"
    assert resolve_loss("auto", 200_001, 1_000, 200_000) == "sampled_softmax"
    assert resolve_loss("auto", 500, 1_000, 400) == "sampled_softmax"  # a sampled threshold under the chunked one: sampled
    assert resolve_loss("full_softmax", 10**7, 1_000, 200_000) == "full_softmax"  # an explicit loss is kept
    for explicit in ("full_softmax", "chunked_softmax", "sampled_softmax"):
        assert resolve_loss(explicit, 10, 5, 5) == explicit
    assert params_from_dict({}).train.loss == "auto"


def test_auto_loss_trains_as_the_loss_it_resolves_to_and_records_it(features, tmp_path, caplog):
    """The default (`auto`) on a catalogue under the thresholds is the full softmax bit for bit; above the first,
    chunked; above the second, sampled."""
    runs = {}
    for name, overrides in {"auto": [], "full": ["train.loss=full_softmax"],
                            "auto-chunked": ["train.chunked_softmax_above_items=10", "train.loss_block_logits=7"],
                            "auto-sampled": ["train.sampled_softmax_above_items=10"]}.items():
        layout = copy_features(features, tmp_path / name)
        p = _params("train.epochs=1", *overrides)
        with caplog.at_level("INFO", logger="pipeline.training.train"):
            result = run_train(p.train, p.tracking, layout, seed=2)
        recorded = json.loads((Path(result.run_dir) / "train.json").read_text())
        runs[name] = (recorded, load_file(str(Path(result.run_dir) / "model.safetensors")))
    assert runs["auto"][0]["loss_resolved"] == "full_softmax" and runs["auto"][0]["train"]["loss"] == "auto"
    assert runs["full"][0]["loss_resolved"] == "full_softmax"
    assert runs["auto-chunked"][0]["loss_resolved"] == "chunked_softmax"
    assert runs["auto-sampled"][0]["loss_resolved"] == "sampled_softmax"
    assert "loss sampled_softmax (train.loss=auto, chunked above 1,000 items, sampled above 10 items)" in caplog.text
    assert "loss chunked_softmax (train.loss=auto, chunked above 10 items, sampled above " in caplog.text
    for key, value in runs["full"][1].items():
        torch.testing.assert_close(runs["auto"][1][key], value, rtol=0, atol=0)
        torch.testing.assert_close(runs["auto-chunked"][1][key], value, rtol=1e-3, atol=1e-4)  # same loss, chunked


def test_resume_against_a_checkpoint_of_another_shape_says_what_differs(features, tmp_path, caplog):
    layout = copy_features(features, tmp_path)
    first = _params("train.epochs=1")
    run_train(first.train, first.tracking, layout, seed=1)
    wider = _params("train.epochs=1", "train.d_model=32")
    with pytest.raises(TrainError, match=r"not of this configuration: item_embedding\.weight: \(\d+, 16\) there, \(\d+, 32\) now.*"
                                         r"train\.d_model: 16 there, 32 now"):
        run_train(wider.train, wider.tracking, layout, seed=1, resume=True)
    # Without --resume (what `dvc repro` runs) the checkpoint of another configuration is replaced, with a warning.
    with caplog.at_level("WARNING", logger="pipeline.training.train"):
        result = run_train(wider.train, wider.tracking, layout, seed=1)
    assert "is of another configuration" in caplog.text and "train.d_model: 16 there, 32 now" in caplog.text
    assert result.epochs_run == 1
    meta = json.loads(torch.load(layout.model_dir("main") / CHECKPOINT_FILE, weights_only=True)["meta_json"])
    assert meta["fingerprint"]["model"]["d_model"] == 32


def test_an_unfinished_run_of_the_same_configuration_continues_without_being_asked(features, tmp_path, caplog):
    """A run of the same configuration with more epochs continues the checkpoint and ends where one run would."""
    straight = copy_features(features, tmp_path / "straight")
    four = _params("train.epochs=4", "train.early_stopping_patience=10")
    a = run_train(four.train, four.tracking, straight, seed=1)
    continued = copy_features(features, tmp_path / "continued")
    two = _params("train.epochs=2", "train.early_stopping_patience=10")
    run_train(two.train, two.tracking, continued, seed=1)
    (continued.model_dir("main") / "model.safetensors").unlink()  # as `dvc repro` deletes the stage's outputs
    with caplog.at_level("INFO", logger="pipeline.training.train"):
        b = run_train(four.train, four.tracking, continued, seed=1)
    assert "resuming the interrupted run of this configuration" in caplog.text
    assert [h["valid_ndcg10"] for h in b.history] == [h["valid_ndcg10"] for h in a.history]
    weights_a, weights_b = (load_file(str(Path(r.run_dir) / "model.safetensors")) for r in (a, b))
    for key in weights_a:
        torch.testing.assert_close(weights_a[key], weights_b[key], rtol=0, atol=0)
    # Fewer epochs than the checkpoint holds: a finished run, so a fresh one starts.
    caplog.clear()
    with caplog.at_level("INFO", logger="pipeline.training.train"):
        again = run_train(two.train, two.tracking, continued, seed=1)
    assert "finished run: starting afresh" in caplog.text and again.epochs_run == 2


def _train_outs(run_name: str = "main") -> list[str]:
    """The train stage's outputs in dvc.yaml, in the work dir: what `dvc repro` deletes before it reruns the stage."""
    import yaml

    outs = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]["outs"]
    return [(next(iter(o)) if isinstance(o, dict) else o).replace("${train.run_name}", run_name) for o in outs
            if not (isinstance(o, dict) and next(iter(o.values())).get("persist"))]


# The train CLI, dying (os._exit: no cleanup) right after epoch 1's checkpoint, before that epoch's MLflow call.
_EXIT_AFTER_CHECKPOINT = """
import os, runpy, sys
from pipeline.training.engine import Engine
save = Engine.save_checkpoint
def save_then_die(self, path):
    save(self, path)
    if self.state.epoch == 1:
        os._exit(9)
Engine.save_checkpoint = save_then_die
sys.argv = ["pipeline", *sys.argv[3:]]  # python -c CODE -m pipeline ARGS: sys.argv is ["-c", "-m", "pipeline", *ARGS]
runpy.run_module("pipeline", run_name="__main__", alter_sys=True)
"""


def _exit_after_checkpoint(layout, overrides: list[str]):
    proc = subprocess.run(_cli(layout.root, *overrides, launcher=[sys.executable, "-c", _EXIT_AFTER_CHECKPOINT]),
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 9, proc.stderr[-3000:]
    return layout.model_dir("main") / CHECKPOINT_FILE


@pytest.mark.slow
@pytest.mark.parametrize("kill", [_train_and_kill, _exit_after_checkpoint], ids=["sigkill", "between-checkpoint-and-mlflow"])
def test_a_killed_train_rerun_as_dvc_reruns_it_resumes_and_finishes_its_mlflow_run(features, tmp_path, kill):
    """Killed after a checkpoint (SIGKILL at any moment, or right before the epoch's MLflow call), the stage's DVC
    outputs deleted, the same command again (no --resume): it resumes, ends with the uninterrupted run's weights,
    and the killed MLflow run is re-opened and FINISHED with every epoch's metrics, each once."""
    from mlflow.tracking import MlflowClient

    overrides = ["train.epochs=5", "train.early_stopping_patience=10", "train.d_model=32"]
    straight = copy_features(features, tmp_path / "straight")
    subprocess.run(_cli(straight.root, *overrides), check=True, capture_output=True, cwd=ROOT, timeout=600)

    killed = copy_features(features, tmp_path / "killed")
    tracked = [*overrides, "tracking.enabled=true", f"tracking.tracking_uri=sqlite:///{killed.root}/mlflow.db"]
    checkpoint = kill(killed, tracked)
    assert torch.load(checkpoint, weights_only=True)["epoch"] < 4
    client = MlflowClient(f"sqlite:///{killed.root}/mlflow.db")
    [orphan] = client.search_runs([client.get_experiment_by_name("leanrec").experiment_id])
    assert orphan.info.status == "RUNNING"  # nothing ended it
    outs = _train_outs()
    assert "models/main/checkpoints" not in outs  # DVC must not delete the checkpoint before the rerun
    for out in outs:
        target = killed.root / out
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)

    rerun = subprocess.run(_cli(killed.root, *tracked), capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming the interrupted run of this configuration" in rerun.stderr
    a = load_file(str(straight.model_dir("main") / "model.safetensors"))
    b = load_file(str(killed.model_dir("main") / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    [run] = client.search_runs([client.get_experiment_by_name("leanrec").experiment_id])
    assert run.info.run_id == orphan.info.run_id and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "valid_ndcg10")] == [0, 1, 2, 3, 4]


def test_a_train_run_ends_the_runs_a_killed_train_left_running(features, tmp_path):
    from mlflow.tracking import MlflowClient

    import mlflow
    from pipeline.core.tracking import PROCESS_TAGS

    layout = copy_features(features, tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("leanrec")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    killed = client.create_run(experiment, run_name="train-main",
                               tags=dict(zip(PROCESS_TAGS, (socket.gethostname(), str(gone.pid), "1.000"), strict=True)))
    p = params_from_dict({}, [*FAST, "train.epochs=1", f"tracking.tracking_uri={uri}"])
    result = run_train(p.train, p.tracking, layout, seed=1)
    assert client.get_run(killed.info.run_id).info.status == "FAILED"
    assert client.get_run(result.mlflow_run_id).info.status == "FINISHED"
    mlflow.set_tracking_uri(None)


def test_a_tracked_train_run_has_the_per_epoch_metrics_and_the_training_curve_figure(features, tmp_path):
    from mlflow.tracking import MlflowClient

    import mlflow
    from pipeline.training.curve import CURVE_ARTIFACT

    layout = copy_features(features, tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    p = params_from_dict({}, [*FAST, "train.epochs=3", "train.early_stopping_patience=10", f"tracking.tracking_uri={uri}"])
    try:
        result = run_train(p.train, p.tracking, layout, seed=1)
    finally:
        mlflow.set_tracking_uri(None)
    client = MlflowClient(uri)
    trained = [r for r in result.history if "loss" in r]
    assert [r["epoch"] for r in trained] == [0, 1, 2]
    for key in ("loss", "valid_ndcg10"):
        logged = sorted((m.step, m.value) for m in client.get_metric_history(result.mlflow_run_id, key))
        assert logged == [(r["epoch"], pytest.approx(r[key])) for r in trained], key
    [figure] = [a for a in client.list_artifacts(result.mlflow_run_id, "plots") if a.path == CURVE_ARTIFACT]
    local = client.download_artifacts(result.mlflow_run_id, CURVE_ARTIFACT, str(tmp_path / "downloaded"))
    assert Path(local).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.file_size > 10_000


def test_the_training_curve_shows_loss_and_validation_ndcg_by_epoch():
    import matplotlib.pyplot as plt

    from pipeline.training.curve import training_curve

    history = [{"epoch": -1, "valid_ndcg10": 0.01}, {"epoch": 0, "loss": 5.0, "valid_ndcg10": 0.05},
               {"epoch": 1, "loss": 4.0, "valid_ndcg10": 0.09}, {"epoch": 2, "loss": 3.5, "valid_ndcg10": 0.08}]
    fig = training_curve(history, "run main")
    try:
        top, bottom = fig.axes
        assert fig._suptitle.get_text() == "run main"
        assert top.get_title() == "Training loss per epoch" and "loss" in top.get_ylabel()
        assert bottom.get_title() == "Validation NDCG@10 after each epoch" and bottom.get_xlabel() == "epoch"
        [loss] = top.get_lines()
        assert list(loss.get_xdata()) == [0, 1, 2] and list(loss.get_ydata()) == [5.0, 4.0, 3.5]
        [ndcg] = bottom.get_lines()
        assert list(ndcg.get_xdata()) == [-1, 0, 1, 2]
        assert [t.get_text() for t in bottom.get_legend().get_texts()] == ["best: epoch 1, 0.0900 (weights kept)"]
    finally:
        plt.close(fig)
