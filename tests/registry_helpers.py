"""A work dir as the compress + evaluate stages leave it: features, a trained teacher, variants and
reports/compression.json with figures measured here (shared by the registry, serving and recommend tests)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.core.config import PolicyConfig, RegistryConfig, TrackingConfig, params_from_dict
from pipeline.core.io import Layout, write_json
from pipeline.data.sequences import load_sequences
from pipeline.evaluation.metrics import evaluate
from pipeline.models.recommender import Recommender
from pipeline.models.sasrec import SASRec, SASRecConfig, count_parameters, save_model
from pipeline.models.variants import save_variant, size_on_disk
from pipeline.training.train import run_train
from tests.helpers import build_features

TRAIN = {"epochs": 4, "d_model": 16, "n_heads": 1, "max_len": 20, "dropout": 0.0, "batch_size": 64, "lr": 0.01,
         "baselines": [], "device": "cpu", "early_stopping_patience": 5}


def build_trained(root: Path, overrides: dict | None = None) -> Layout:
    """Tiny features (TINY with `overrides`) and a trained teacher in models/main (tracking off)."""
    layout = build_features(root, overrides)
    params = params_from_dict({"train": TRAIN})
    run_train(params.train, TrackingConfig(enabled=False), layout, seed=0)
    return layout


def clone_workdir(source: Layout, root: Path) -> Layout:
    shutil.copytree(source.root / "data", root / "data")
    shutil.copytree(source.root / "models", root / "models")
    return Layout(root)


def save_random_model(layout: Layout, run: str, seed: int = 1) -> Path:
    """An untrained SASRec of the teacher's shape: a deliberately worse model."""
    cfg = json.loads((layout.model_dir("main") / "model_config.json").read_text())
    torch.manual_seed(seed)
    directory = layout.model_dir(run)
    save_model(SASRec(SASRecConfig(**cfg)), directory)
    return directory


def measure(layout: Layout, directory: Path, kind: str, repeats: int = 20) -> dict:
    """The compression.json figures of one model, measured on the test split."""
    rec = Recommender.load(directory)
    data = load_sequences(layout.features_dir)
    metrics = evaluate(lambda b: rec.model.score(b.inputs, b.lengths), data, "test", ks=(10,), max_len=rec.max_len,
                       sampled_strategies=(), seed=0, progress=False)
    history = [data.items[data.offsets[0] : data.offsets[0] + 5].tolist()]
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        rec.recommend(history, k=10)
        timings.append((time.perf_counter() - started) * 1000)
    size = size_on_disk(directory)
    return {
        "path": str(directory.relative_to(layout.root)), "kind": kind, "ndcg@10": metrics["full/NDCG@10"],
        "hr@10": metrics["full/HR@10"], "size_bytes": size, "parameters": count_parameters(rec.model),
        "bytes_per_item": size / rec.n_items, "latency_p50_ms": float(np.percentile(timings, 50)),
        "latency_p95_ms": float(np.percentile(timings, 95)), "throughput_users_s": 1000 / float(np.mean(timings)),
        "mlflow_run_id": None,
    }


def write_compression(layout: Layout, models: dict[str, dict], teacher: str = "teacher") -> Path:
    base = models[teacher]["ndcg@10"]
    for entry in models.values():
        entry["ndcg@10_change"] = (entry["ndcg@10"] - base) / base if base else 0.0
    report = {"split": "test", "device": "cpu", "threads": torch.get_num_threads(), "teacher": teacher, "models": models}
    return write_json(report, layout.reports_dir / "compression.json")


def compress(layout: Layout, kinds: tuple[str, ...] = ("int8_table",)) -> dict[str, dict]:
    """Variants of models/main saved like the compress stage does, and their measured figures."""
    from pipeline.models.sasrec import load_model

    teacher_dir = layout.model_dir("main")
    teacher = load_model(teacher_dir)
    models = {"teacher": measure(layout, teacher_dir, "fp32")}
    for kind in kinds:
        directory = save_variant(teacher, teacher_dir / "variants" / kind, kind)
        models[kind] = measure(layout, directory, kind)
    write_compression(layout, models)
    return models


# ----------------------------------------------------------------------------- registry tests


# The policy without its default latency criteria (registry.policy.max_latency_p50_ms: 50.0, min_latency_speedup: 1.0).
NO_BUDGET = RegistryConfig(policy=PolicyConfig(max_latency_p50_ms=None, min_latency_speedup=None))


def sqlite_tracking(root: Path) -> TrackingConfig:
    return TrackingConfig(tracking_uri=f"sqlite:///{root}/mlflow.db")


def aliases(tracking: TrackingConfig, name: str = "leanrec") -> dict[str, str]:
    from mlflow import MlflowClient

    found = MlflowClient(tracking.tracking_uri, tracking.tracking_uri).get_registered_model(name).aliases
    return {alias: str(version) for alias, version in found.items()}


def register_only(work: Layout, tracking: TrackingConfig, name: str, cfg: RegistryConfig | None = None, **figures) -> dict:
    """Register one model as the challenger: quality measured, latency fabricated (1 ms unless given), so the
    default latency budget never depends on how loaded the test machine is."""
    from pipeline.registry.register import register

    entry = measure(work, work.model_dir(name) if name in ("random", "main") else work.root / name, "fp32")
    entry.update({"latency_p50_ms": 1.0, **figures})
    write_compression(work, {"teacher": entry})
    return register(cfg or RegistryConfig(), tracking, work)


def stored_model_dir(tracking: TrackingConfig, version: str, name: str = "leanrec") -> Path:
    """Where the artifact store keeps a registered version's files (a local folder in these tests)."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking.tracking_uri)
    source = MlflowClient(tracking.tracking_uri, tracking.tracking_uri).get_model_version(name, version).source
    location = mlflow.get_logged_model(source.removeprefix("models:/")).artifact_location
    return Path(location.removeprefix("file://"))


def copy_of_teacher(work: Layout, name: str, dropout: float) -> str:
    """The teacher's weights under models/<name> with another config value: same quality, other content hash."""
    target = work.root / "models" / name
    shutil.copytree(work.model_dir("main"), target)
    config = json.loads((work.model_dir("main") / "model_config.json").read_text())
    (target / "model_config.json").write_text(json.dumps({**config, "dropout": dropout}))
    return f"models/{name}"
