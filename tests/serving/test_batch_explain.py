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


def test_cli_explains_a_user_of_a_champion_with_integer_user_ids(champion, capsys):
    import json

    from pipeline.orchestration.cli import main

    layout, tracking, registered = champion
    data = load_sequences(layout.features_dir)
    users = pq.read_table(layout.features_dir / "user_vocab.parquet").to_pandas()
    raw_user = dict(zip(users["index"], users["id"], strict=True))[data.users[3]]
    argv = ["explain", "--workdir", str(layout.root), "-S", f"tracking.tracking_uri={tracking.tracking_uri}",
            "--user-id", str(raw_user), "--k", "2"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["version"] == registered["version"] and len(out["recommendations"]) == 2
    history = data.items[data.offsets[3] : data.offsets[3 + 1]].tolist()
    items = pq.read_table(layout.features_dir / "item_vocab.parquet").to_pandas()
    raw_item = dict(zip(items["index"], items["id"], strict=True))
    expected, _ = Recommender.load(layout.root / registered["path"]).recommend([history], k=2)
    assert [r["item_id"] for r in out["recommendations"]] == [raw_item[i] for i in expected[0].tolist()]
    assert all(b["item_id"] in {raw_item[i] for i in history} for r in out["recommendations"] for b in r["because"])
    assert main(argv[:-4] + ["--user-id", "not-a-number"]) == 2
