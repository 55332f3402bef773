"""DVC-cached outputs depend on their inputs only: a stage rerun on the same inputs writes the same bytes.

A cached output that records a wall-clock timing, a timestamp or an absolute path changes its hash on every
rerun, so DVC reruns every stage after it although nothing changed, and a fresh clone's dvc.lock differs
from the committed one. Timings belong in the stage's report under reports/ (cache: false).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from pipeline.orchestration import cli
from pipeline.orchestration.runs import COMPRESSION_VARIANTS
from tests.helpers import TINY

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("ingest", "validate", "features", "train", "compress")


def cached_outputs(stage: dict, run_name: str) -> list[str]:
    """The stage's outputs DVC caches (every `outs` entry without `cache: false`), as paths."""
    paths = []
    for out in stage.get("outs", []):
        path, settings = (out, {}) if isinstance(out, str) else next(iter(out.items()))
        if settings.get("cache", True):
            paths.append(path.replace("${train.run_name}", run_name))
    return paths


def digests(root: Path, paths: list[str]) -> dict[str, str]:
    """sha256 of every file under each path (a file or a directory), by path relative to `root`."""
    found = {}
    for path in paths:
        target = root / path
        files = sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else [target]
        assert files and all(f.exists() for f in files), f"{path} was not written"
        for file in files:
            found[str(file.relative_to(root))] = hashlib.sha256(file.read_bytes()).hexdigest()
    return found


def _tiny_params(path: Path) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TINY.items():
        for key, value in values.items():
            params[section][key] = {**params[section][key], **value} if isinstance(value, dict) else value
    params["validate"]["data_docs"] = False
    params["train"].update(d_model=16, n_heads=1, epochs=2, num_threads=1)
    params["train"]["bpr"]["epochs"] = 2
    compress = params["compress"]
    compress["variants"] = list(COMPRESSION_VARIANTS)  # every variant, lowrank too
    compress["distill"].update(d_model=8, epochs=1)
    compress["pruning"]["finetune_epochs"] = 1
    compress["lowrank"].update(rank=4, finetune_epochs=1)
    compress["pq"].update(n_subspaces=4, finetune_epochs=1)
    params["tracking"]["enabled"] = False
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.mark.slow
def test_rerunning_a_stage_on_the_same_inputs_writes_identical_cached_outputs(tmp_path, monkeypatch):
    """Each stage twice in one work directory (a rerun, which may reuse its earlier work), then the whole
    chain once in another (a fresh clone): every cached output the same bytes. Each runs with the work
    directory as the current one and `--workdir .`, as `dvc repro` runs them."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    params = _tiny_params(tmp_path / "params.yaml")

    def run(name: str, workdir: Path) -> dict[str, str]:
        workdir.mkdir(exist_ok=True)
        monkeypatch.chdir(workdir)
        assert cli.main([name, "--params", str(params), "--workdir", "."]) == 0, name
        return digests(workdir, cached_outputs(stages[name], "main"))

    for name in STAGES:
        assert cached_outputs(stages[name], "main"), f"{name} has no cached output"
        first, rerun, fresh = run(name, tmp_path / "a"), run(name, tmp_path / "a"), run(name, tmp_path / "b")
        for label, other in (("a rerun", rerun), ("a fresh run", fresh)):
            changed = sorted(p for p in first.keys() | other.keys() if first.get(p) != other.get(p))
            assert not changed, f"{name}: {label} changed {changed}"
