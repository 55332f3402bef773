"""End to end: `dvc repro` on a copy of the repository runs every stage (ingest -> ... -> compress ->
evaluate), writes the compression report and chart, and a second `dvc repro` with nothing changed does no work."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import copy_repo

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture
def repo_copy(tmp_path) -> Path:
    return copy_repo(tmp_path / "repo", commit=False)


def params_variants(repo: Path) -> list[str]:
    return yaml.safe_load((repo / "params.yaml").read_text())["compress"]["variants"]


def test_dvc_repro_runs_and_second_repro_does_nothing(repo_copy):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "GX_ANALYTICS_ENABLED": "false"}
    dvc = [sys.executable, "-m", "dvc"]
    first = _run([*dvc, "repro"], repo_copy, env)
    for stage in ("ingest", "validate", "features", "train", "compress", "evaluate"):
        assert f"Running stage '{stage}'" in first.stdout
    stats = json.loads((repo_copy / "reports/features.json").read_text())
    assert stats["interactions"] > 0
    validation = json.loads((repo_copy / "reports/validation.json").read_text())
    assert validation["rows_in"] == validation["rows_passed"] + validation["rows_quarantined"]
    metrics = json.loads((repo_copy / "reports/metrics.json").read_text())
    assert set(metrics["models"]) == {"sasrec", "popularity", "bpr"}
    compression = json.loads((repo_copy / "reports/compression.json").read_text())
    assert set(compression["models"]) == {"teacher", *params_variants(repo_copy)}
    assert (repo_copy / "reports/compression.png").stat().st_size > 0
    # DVC's metrics are the compact summary only (the full reports are plain outputs), the chart a plot
    shown = json.loads(_run([*dvc, "metrics", "show", "--json"], repo_copy, env).stdout)
    files = {path for entry in shown.values() for path in entry["data"]}
    assert files == {"reports/summary.json"}, shown
    (workspace,) = shown.values()
    summary = workspace["data"]["reports/summary.json"]["data"]
    assert {"teacher", "popularity", "bpr", "chosen"} == set(summary) and summary["chosen"]["size_bytes"] > 0
    plots = _run([*dvc, "plots", "show", "--json"], repo_copy, env).stdout
    assert "reports/compression.png" in plots and "Validation NDCG@10" in plots
    assert "reports/registration.png" in plots and (repo_copy / "reports/registration.png").stat().st_size > 0
    # `dvc metrics diff` against the committed run (HEAD) reads the cached summary: it works, no change.
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    _run(["git", "add", "-A"], repo_copy, env)
    _run([*git, "commit", "-q", "-m", "run"], repo_copy, env)
    assert json.loads(_run([*dvc, "metrics", "diff", "--json"], repo_copy, env).stdout) == {}

    second = _run([*dvc, "repro"], repo_copy, env)
    assert "Running stage" not in second.stdout
    assert "up to date" in second.stdout
    status = _run([*dvc, "status", "--json"], repo_copy, env)
    assert json.loads(status.stdout) == {}

    # Changing one parameter re-runs only the stages that depend on it.
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["features"]["min_user_interactions"] = 6
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = _run([*dvc, "repro"], repo_copy, env)
    assert "Running stage 'features'" in third.stdout
    assert "Running stage 'ingest'" not in third.stdout and "Running stage 'validate'" not in third.stdout


def test_dvc_repro_after_a_killed_train_resumes_it(tmp_path):
    """`dvc repro` killed (SIGKILL, the whole process group) during train, then `dvc repro` again: DVC keeps the
    checkpoint (no stage output), and train continues from it instead of starting over."""
    import signal
    import time

    import torch

    repo = copy_repo(tmp_path / "repo", epochs=8, commit=False)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "GX_ANALYTICS_ENABLED": "false"}
    dvc = [sys.executable, "-m", "dvc"]
    checkpoint = repo / "models/main/checkpoints/last.pt"
    proc = subprocess.Popen([*dvc, "repro", "train"], cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if checkpoint.exists() and torch.load(checkpoint, weights_only=True)["epoch"] >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "dvc repro finished before train could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # dvc and the train process it started
    proc.wait()
    killed_at = torch.load(checkpoint, weights_only=True)["epoch"]
    assert killed_at < 7

    again = _run([*dvc, "repro", "train"], repo, env)
    assert "Running stage 'train'" in again.stdout and "Running stage 'features'" not in again.stdout
    log = again.stdout + again.stderr
    assert "resuming the interrupted run of this configuration" in log, log[-3000:]
    history = json.loads((repo / "models/main/history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(len(history))) and len(history) > killed_at + 1
    assert (repo / "models/main/model.safetensors").exists()
    assert json.loads(_run([*dvc, "status", "train", "--json"], repo, env).stdout) == {}
