"""MLflow tracking: where runs go, and the lineage every run records.

The embedded default is a SQLite store and a local artifact folder inside the
work directory; `MLFLOW_TRACKING_URI` (or `tracking.tracking_uri`) sends runs to
a tracking server instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.config import TrackingConfig

logger = logging.getLogger(__name__)


RUN_INFO_FILE = "run.json"  # in models/<run>/: the MLflow run that trained it


def write_run_id(run_dir: Path, run_id: str | None) -> None:
    from pipeline.core.io import write_json

    write_json({"mlflow_run_id": run_id}, run_dir / RUN_INFO_FILE)


def read_run_id(run_dir: Path) -> str | None:
    """The MLflow run that trained the model in `run_dir`, if it was tracked."""
    path = run_dir / RUN_INFO_FILE
    return json.loads(path.read_text(encoding="utf-8"))["mlflow_run_id"] if path.exists() else None


def resolve_tracking_uri(cfg: TrackingConfig, root: Path) -> str:
    if cfg.tracking_uri:
        return cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


def _experiment_id(mlflow: Any, cfg: TrackingConfig, root: Path) -> str:
    experiment = mlflow.get_experiment_by_name(cfg.experiment)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if resolve_tracking_uri(cfg, root).startswith("sqlite:"):
        # Local store: keep artifacts beside the database, inside the work dir.
        artifact_location = (root / "mlartifacts").resolve().as_uri()
    try:
        return mlflow.create_experiment(cfg.experiment, artifact_location=artifact_location)
    except Exception:  # created meanwhile by a concurrent run
        experiment = mlflow.get_experiment_by_name(cfg.experiment)
        if experiment is None:
            raise
        return experiment.experiment_id


@contextlib.contextmanager
def mlflow_run(
    cfg: TrackingConfig, root: Path, run_name: str, run_id: str | None = None, tags: dict | None = None, system_metrics: bool = True
) -> Iterator[Any | None]:
    """An active MLflow run (None when tracking is disabled). `run_id` re-opens an existing run."""
    if not cfg.enabled:
        yield None
        return
    import mlflow

    mlflow.set_tracking_uri(resolve_tracking_uri(cfg, root))
    experiment_id = _experiment_id(mlflow, cfg, root)
    with mlflow.start_run(
        run_id=run_id, experiment_id=None if run_id else experiment_id, run_name=None if run_id else run_name,
        tags=tags, log_system_metrics=system_metrics,
    ) as run:
        yield run


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def git_commit(cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def dvc_locked_hash(root: Path, out_path: str) -> str | None:
    """The hash dvc.lock records for an output (e.g. data/features), if this root is a DVC workspace."""
    lock = root / "dvc.lock"
    if not lock.exists():
        return None
    stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {})
    for stage in stages.values():
        for out in stage.get("outs", []):
            if out.get("path") == out_path:
                return out.get("md5")
    return None


def directory_sha256(path: Path) -> str:
    """Content hash of every file below `path` (names and bytes), independent of DVC."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def lineage_tags(root: Path, features_dir: Path) -> dict[str, str]:
    tags = {"leanrec.features.sha256": directory_sha256(features_dir)}
    commit = git_commit(root) or git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    locked = dvc_locked_hash(root, "data/features")
    if locked:
        tags["leanrec.features.dvc_md5"] = locked
    return tags
