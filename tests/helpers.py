"""Shared builders for tests that need features on disk."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from pipeline.core.config import params_from_dict
from pipeline.core.io import Layout
from pipeline.core.tracking import flatten
from pipeline.data.features import run_features
from pipeline.data.ingest import run_ingest

# The one tiny-data configuration of the suite (a few thousand synthetic interactions): the `tiny_params`
# fixture, `build_features` and the DAG form below all start from it.
TINY = {
    "ingest": {"synthetic": {"n_interactions": 6000, "n_items": 150, "mean_sequence_length": 20.0, "n_topics": 5}},
    "validate": {"min_rows": 100},
    "features": {"min_user_interactions": 3, "min_item_interactions": 3},
}

# TINY as the DAG form sends it: form fields plus `overrides` (the same values, and a tiny model).
_FORM_FIELDS = {"ingest.synthetic.n_interactions": "synthetic_interactions", "ingest.synthetic.n_items": "synthetic_items"}
TINY_FORM = {
    **{field: flatten(TINY)[key] for key, field in _FORM_FIELDS.items()},
    "epochs": 2,
    "compression_variants": ["int8", "distilled"],  # one of each mapped group (CPU, GPU pool)
    "overrides": [
        *(f"{key}={value}" for key, value in flatten(TINY).items() if key not in _FORM_FIELDS),
        "compress.distill.epochs=1", "compress.distill.d_model=8", "compress.latency_requests=10",
        "compress.throughput_batch_size=64", "validate.data_docs=false",
        "train.d_model=16", "train.n_heads=1", "train.bpr.epochs=2", "train.num_threads=1",
    ],
}


def build_features(root: Path, overrides: dict | None = None) -> Layout:
    """Synthetic ingest -> features under `root` (validation is skipped: the data is generated clean)."""
    params = params_from_dict({**TINY, **(overrides or {})})
    layout = Layout(root)
    run_ingest(params.ingest, layout, seed=params.seed)
    layout.validated_interactions.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(layout.raw_interactions, layout.validated_interactions)
    run_features(params.features, layout)
    return layout


def copy_features(source: Layout, root: Path) -> Layout:
    target = Layout(root)
    shutil.copytree(source.features_dir, target.features_dir)
    return target


def copy_repo(dest: Path, epochs: int = 2, commit: bool = True) -> Path:
    """This repository's tracked and untracked (not ignored) files in a fresh git repo at `dest`,
    with params.yaml scaled down so the whole pipeline runs in a minute or two."""
    import subprocess

    import yaml

    root = Path(__file__).resolve().parents[1]
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                            cwd=root, capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, listed):
        if (root / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / rel, dest / rel)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["ingest"]["synthetic"].update(n_interactions=20_000, n_items=500)
    params["validate"]["data_docs"] = False
    params["train"].update(d_model=16, n_heads=1, epochs=epochs)
    params["train"]["bpr"]["epochs"] = 2
    params["compress"]["distill"].update(d_model=8, epochs=1)
    params["compress"]["pruning"]["finetune_epochs"] = 1
    params["compress"]["lowrank"]["rank"] = 4
    params["compress"]["pq"]["finetune_epochs"] = 1
    params["compress"].update(latency_requests=10, throughput_batch_size=64)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    if commit:
        git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
        subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
        subprocess.run([*git, "commit", "-q", "-m", "copy"], cwd=dest, check=True)
    return dest


@contextlib.contextmanager
def mlflow_uris_kept() -> Iterator[None]:
    """Restore MLflow's tracking and registry URIs on exit: mlflow.set_tracking_uri / set_registry_uri also write
    MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI into os.environ, so every later subprocess inherited them."""
    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        if "mlflow" in sys.modules:  # the module-level URIs too, for the tests that run in this process
            import mlflow

            mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])
            mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
