"""End to end: `dvc repro` on a copy of the repository runs every stage (ingest -> ... -> compress ->
evaluate), writes the compression report and chart, and a second `dvc repro` with nothing changed does no work."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture
def repo_copy(tmp_path) -> Path:
    """The tracked and untracked (not ignored) files of this repo in a fresh git + DVC repo."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split("\0")
    dest = tmp_path / "repo"
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["ingest"]["synthetic"].update(n_interactions=20_000, n_items=500)
    params["validate"]["data_docs"] = False
    params["train"].update(epochs=2, d_model=16, n_heads=1)
    params["train"]["bpr"]["epochs"] = 2
    params["compress"]["distill"].update(d_model=8, epochs=1)
    params["compress"]["pruning"]["finetune_epochs"] = 1
    params["compress"]["lowrank"]["rank"] = 4
    params["compress"].update(latency_requests=10, throughput_batch_size=64)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


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
    # DVC sees the report as metrics and the chart as a plot
    shown = json.loads(_run([*dvc, "metrics", "show", "--json"], repo_copy, env).stdout)
    assert any("reports/compression.json" in str(entry) for entry in shown.values())
    plots = _run([*dvc, "plots", "show", "--json"], repo_copy, env).stdout
    assert "reports/compression.png" in plots

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
