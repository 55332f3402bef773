"""Shared builders for tests that need features on disk."""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.config import params_from_dict
from pipeline.features import run_features
from pipeline.ingest import run_ingest
from pipeline.io import Layout

TINY = {
    "ingest": {"synthetic": {"n_interactions": 6000, "n_items": 150, "mean_sequence_length": 20.0, "n_topics": 5}},
    "features": {"min_user_interactions": 3, "min_item_interactions": 3},
}

# TINY as the DAG form sends it: form fields plus `overrides`.
TINY_FORM = {
    "synthetic_interactions": 6000,
    "synthetic_items": 150,
    "epochs": 2,
    "compression_variants": ["int8", "distilled"],  # one of each mapped group (CPU, GPU pool)
    "overrides": [
        "compress.distill.epochs=1", "compress.distill.d_model=8", "compress.latency_requests=10",
        "compress.throughput_batch_size=64",
        "ingest.synthetic.mean_sequence_length=20.0", "ingest.synthetic.n_topics=5",
        "features.min_user_interactions=3", "features.min_item_interactions=3",
        "validate.min_rows=100", "validate.data_docs=false",
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
