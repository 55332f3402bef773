"""Behavioural tests of a trained recommender (minimum functionality, direction, invariance).

The model is trained by the real train stage on interactions with a known structure: every user
walks a chain of items, each item followed by the next one (modulo the catalogue). A recommender
that learnt anything from sequences must recommend an item's successor; one that ignores order
cannot. The expected behaviour is stated in raw item IDs, mapped through the features' vocabulary.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core import schema
from pipeline.core.config import TrackingConfig, params_from_dict
from pipeline.core.io import Layout, write_parquet
from pipeline.data.features import run_features
from pipeline.models.recommender import Recommender
from pipeline.training.train import run_train

N_ITEMS = 40  # raw item IDs 0..39; item i is always followed by (i + 1) % N_ITEMS
N_USERS = 400
LENGTH = 12


def _successor(item: int) -> int:
    return (item + 1) % N_ITEMS


@pytest.fixture(scope="module")
def chain_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("chains")
    layout = Layout(root)
    rng = np.random.default_rng(0)
    starts = rng.integers(0, N_ITEMS, N_USERS)
    users = np.repeat(np.arange(N_USERS), LENGTH)
    items = (starts[:, None] + np.arange(LENGTH)[None, :]).reshape(-1) % N_ITEMS
    base = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    times = [base + dt.timedelta(minutes=int(u) * 100 + int(p)) for u, p in zip(users, np.tile(np.arange(LENGTH), N_USERS))]
    table = pa.table({
        schema.USER: pa.array(users, pa.int64()), schema.ITEM: pa.array(items, pa.int64()),
        schema.TIMESTAMP: pa.array(times, schema.TIMESTAMP_TYPE), schema.RATING: pa.array(np.full(len(users), 5.0), pa.float32()),
        schema.SOURCE: pa.array(["chains"] * len(users), pa.string()),
    }, schema=schema.raw_schema(pa.int64()))
    write_parquet(table, layout.validated_interactions)
    params = params_from_dict({
        "features": {"min_user_interactions": 3, "min_item_interactions": 3},
        "train": {"d_model": 32, "n_layers": 1, "n_heads": 1, "max_len": 16, "dropout": 0.0, "epochs": 15,
                  "early_stopping_patience": 15, "lr": 0.005, "baselines": []},
    })
    run_features(params.features, layout)
    run_train(params.train, TrackingConfig(enabled=False), layout, seed=0)
    vocab = pq.read_table(layout.features_dir / "item_vocab.parquet").to_pandas()
    to_index = dict(zip(vocab["id"].astype(int), vocab["index"].astype(int), strict=True))
    to_raw = {index: raw for raw, index in to_index.items()}
    return Recommender.load(layout.model_dir("main")), to_index, to_raw


def _top1(model: Recommender, to_index: dict, to_raw: dict, history: list[int]) -> int:
    items, _ = model.recommend([[to_index[i] for i in history]], k=1)
    return to_raw[int(items[0, 0])]


def test_minimum_functionality_recommends_the_successor(chain_model):
    model, to_index, to_raw = chain_model
    hits = [_top1(model, to_index, to_raw, [(k - 2) % N_ITEMS, (k - 1) % N_ITEMS, k]) == _successor(k) for k in range(N_ITEMS)]
    assert np.mean(hits) >= 0.9


def test_directional_the_last_item_steers_the_recommendation(chain_model):
    """Appending one more step of the walk moves the top recommendation one step on."""
    model, to_index, to_raw = chain_model
    moved = 0
    for k in range(N_ITEMS):
        history = [(k - 2) % N_ITEMS, (k - 1) % N_ITEMS, k]
        before = _top1(model, to_index, to_raw, history)
        after = _top1(model, to_index, to_raw, [*history, _successor(k)])
        moved += before == _successor(k) and after == _successor(_successor(k))
    assert moved >= 0.85 * N_ITEMS


def test_invariance_to_the_other_histories_in_a_batch(chain_model):
    """A user's recommendations do not depend on who else is scored in the same batch (or on padding)."""
    model, to_index, _ = chain_model
    history = [to_index[i] for i in (3, 4, 5)]
    others = [[to_index[i] for i in range(10, 22)], [to_index[30]]]
    alone, alone_scores = model.recommend([history], k=10)
    together, together_scores = model.recommend([others[0], history, others[1]], k=10)
    assert alone[0].tolist() == together[1].tolist()
    np.testing.assert_allclose(alone_scores[0].numpy(), together_scores[1].numpy(), rtol=1e-5, atol=1e-5)
