"""Warm start of SASRec from a model with a smaller catalogue (pipeline/training/warmstart.py, train.init_from)."""

from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from pipeline.core.config import params_from_dict
from pipeline.core.errors import TrainError
from pipeline.models.sasrec import SASRec, SASRecConfig, save_model
from pipeline.training.train import run_train
from pipeline.training.warmstart import TABLE_KEY, grow_state, warm_start
from tests.helpers import build_features

FAST = ["train.d_model=16", "train.n_heads=2", "train.n_layers=1", "train.max_len=20", "train.batch_size=32",
        "train.num_threads=1", "train.baselines=[]", "tracking.enabled=false"]


def _model(n_items: int, seed: int, **shape) -> SASRec:
    torch.manual_seed(seed)
    return SASRec(SASRecConfig(n_items=n_items, **{"d_model": 16, "n_heads": 2, "n_layers": 1, "max_len": 20, **shape}))


def test_grow_state_keeps_old_rows_and_fresh_new_rows():
    old, new = _model(10, seed=1), _model(15, seed=2)
    fresh = {k: v.clone() for k, v in new.state_dict().items()}
    grown = grow_state(old.state_dict(), new.state_dict())
    assert torch.equal(grown[TABLE_KEY][:11], old.state_dict()[TABLE_KEY])
    assert torch.equal(grown[TABLE_KEY][11:], fresh[TABLE_KEY][11:])
    assert torch.count_nonzero(grown[TABLE_KEY][0]) == 0  # padding row
    for key in fresh:
        if key != TABLE_KEY:
            assert torch.equal(grown[key], old.state_dict()[key])


def test_warm_start_refuses_a_smaller_catalogue_or_another_shape(tmp_path):
    save_model(_model(10, seed=1), tmp_path / "old")
    with pytest.raises(TrainError, match="must extend the old one"):
        warm_start(_model(8, seed=2), tmp_path / "old")
    with pytest.raises(TrainError, match="shape differs"):
        warm_start(_model(12, seed=2, d_model=32), tmp_path / "old")
    with pytest.raises(TrainError, match="no SASRec model there"):
        warm_start(_model(12, seed=2), tmp_path / "nothing")


def test_training_warm_starts_with_grown_item_table(tmp_path):
    first = build_features(tmp_path / "first")
    p = params_from_dict({}, [*FAST, "train.epochs=1"])
    old_dir = Path(run_train(p.train, p.tracking, first, seed=1).run_dir)
    old_table = load_file(str(old_dir / "model.safetensors"))[TABLE_KEY]

    # A later batch with more items; the vocabulary is extended, so old items keep their index.
    second = build_features(tmp_path / "second", {
        "ingest": {"synthetic": {"n_interactions": 6000, "n_items": 200, "mean_sequence_length": 20.0, "n_topics": 5}},
        "features": {"min_user_interactions": 3, "min_item_interactions": 3, "vocab_from": str(first.features_dir)},
    })
    old_vocab = pd.read_parquet(first.features_dir / "item_vocab.parquet")
    new_vocab = pd.read_parquet(second.features_dir / "item_vocab.parquet")
    assert len(new_vocab) > len(old_vocab)
    assert new_vocab.head(len(old_vocab)).equals(old_vocab)

    # A vanishing learning rate: the trained weights are the warm-started ones.
    p2 = params_from_dict({}, [*FAST, "train.epochs=1", "train.lr=1.0e-12", f"train.init_from={old_dir}"])
    new_dir = Path(run_train(p2.train, p2.tracking, second, seed=2).run_dir)
    new_table = load_file(str(new_dir / "model.safetensors"))[TABLE_KEY]
    assert new_table.shape[0] == len(new_vocab) + 1
    torch.testing.assert_close(new_table[: old_table.shape[0]], old_table, atol=1e-6, rtol=0)


def test_init_from_is_for_sasrec_only(tmp_path):
    layout = build_features(tmp_path)
    p = params_from_dict({}, [*FAST, "train.model=popularity", f"train.init_from={tmp_path}"])
    with pytest.raises(TrainError, match="SASRec only"):
        run_train(p.train, p.tracking, layout, seed=1)
