"""Batch recommendations with `recommend.explain`: the top supporting raw item IDs and weights per row."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from pipeline.core.config import RecommendConfig
from pipeline.data.sequences import load_sequences
from pipeline.models.explain import explain
from pipeline.models.recommender import Recommender
from pipeline.serving.batch import recommendations_path
from tests.serving import test_batch

champion = test_batch.champion  # the module's trained, registered and promoted champion


def test_explain_adds_the_supporting_history_items_of_every_recommendation(champion):
    layout, tracking, registered = champion
    plain = test_batch.recommend(RecommendConfig(k=4, batch_size=64, device="cpu"), tracking, layout)
    assert "because" not in pq.read_schema(recommendations_path(layout)).names
    summary = test_batch.recommend(RecommendConfig(k=4, batch_size=64, device="cpu", explain=True), tracking, layout)
    assert summary["rows"] == plain["rows"]
    frame = pq.read_table(recommendations_path(layout)).to_pandas()
    items = pq.read_table(layout.features_dir / "item_vocab.parquet").to_pandas()
    users = pq.read_table(layout.features_dir / "user_vocab.parquet").to_pandas()
    raw_item = dict(zip(items["index"], items["id"], strict=True))
    raw_user = dict(zip(users["index"], users["id"], strict=True))
    data = load_sequences(layout.features_dir)
    rec = Recommender.load(layout.root / registered["path"])
    assert frame["because"].map(len).gt(0).mean() > 0.5 and (frame["because"].map(len) <= 3).all()
    for row in (0, 70, len(data.users) - 1):
        history = data.items[data.offsets[row] : data.offsets[row + 1]].tolist()
        got = frame[frame["user_id"] == raw_user[data.users[row]]].sort_values("rank")
        expected = explain(rec, [history], [[{v: k for k, v in raw_item.items()}[i] for i in got["item_id"]]])[0]
        for (_, line), because in zip(got.iterrows(), expected, strict=True):
            assert list(line["because"]) == [raw_item[i] for i, _ in because]
            np.testing.assert_allclose(line["because_weights"], [w for _, w in because], rtol=1e-4, atol=1e-5)
            assert set(line["because"]) <= {raw_item[i] for i in history}
