"""Batch recommendations with the registry's champion (serving/batch.py, fed by registry/store.py:load_champion)."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from pipeline.core.config import RecommendConfig, RegistryConfig, TrackingConfig
from pipeline.core.devices import select_device
from pipeline.core.errors import ConfigError, RegistryError, ServingError
from pipeline.data.sequences import load_sequences
from pipeline.models.recommender import Recommender
from pipeline.registry.promote import promote
from pipeline.registry.register import register
from pipeline.registry.store import load_champion
from pipeline.serving.batch import check_histories, recommendations_path, run_recommend
from tests.registry_helpers import build_trained, compress


def recommend(cfg: RecommendConfig, tracking: TrackingConfig, layout, registry: RegistryConfig | None = None) -> dict:
    """The recommend stage as the CLI wires it: histories checked, champion loaded, users scored."""
    registry = registry or RegistryConfig()
    check_histories(cfg, layout)
    servable, version = load_champion(registry, tracking, layout.root)
    return run_recommend(cfg, servable, layout, model_name=registry.model_name, version=version)


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    root = tmp_path_factory.mktemp("recommend")
    layout = build_trained(root)
    compress(layout, ("int8_table",))
    tracking = TrackingConfig(tracking_uri=f"sqlite:///{root}/mlflow.db")
    registered = register(RegistryConfig(), tracking, layout)
    promote(RegistryConfig(), tracking, layout)
    return layout, tracking, registered


def test_every_known_user_gets_the_champions_top_k(champion):
    layout, tracking, registered = champion
    summary = recommend(RecommendConfig(k=7, batch_size=50, device="cpu"), tracking, layout)
    data = load_sequences(layout.features_dir)
    frame = pq.read_table(recommendations_path(layout)).to_pandas()
    assert summary["users"] == len(data.users) and summary["rows"] == len(frame) == 7 * len(data.users)
    assert summary["version"] == registered["version"] and summary["sources"] == {"model": len(data.users), "popularity": 0}
    assert frame.groupby("user_id")["rank"].apply(list).map(lambda r: r == list(range(1, 8))).all()
    assert (frame.groupby("user_id")["score"].diff().dropna() <= 1e-6).all()  # best first

    items = pq.read_table(layout.features_dir / "item_vocab.parquet").to_pandas()
    users = pq.read_table(layout.features_dir / "user_vocab.parquet").to_pandas()
    raw_item = dict(zip(items["index"], items["id"], strict=True))
    raw_user = dict(zip(users["index"], users["id"], strict=True))
    rec = Recommender.load(layout.root / registered["path"])
    by_user = frame.groupby("user_id")["item_id"].apply(list)
    for row in (0, 17, len(data.users) - 1):  # batches of 50: first, inner, and the last partial batch
        history = data.items[data.offsets[row] : data.offsets[row + 1]].tolist()
        expected, _ = rec.recommend([history], k=7)
        got = by_user[raw_user[data.users[row]]]
        assert got == [raw_item[i] for i in expected[0].tolist()]
        assert not {i for i, r in raw_item.items() if r in got} & set(history)


def test_recommend_without_a_champion_says_so(champion, tmp_path):
    layout, _, _ = champion
    with pytest.raises(RegistryError, match="no 'champion': run register and promote first"):
        recommend(RecommendConfig(), TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/empty.db"), layout)


def test_device_choice(champion, tmp_path):
    import torch

    assert select_device("cpu", "recommend.device") == torch.device("cpu")
    assert select_device("auto", "recommend.device").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="recommend.device=cuda but no CUDA device"):
            select_device("cuda", "recommend.device")
    with pytest.raises(ConfigError, match="choose auto, cpu or cuda"):
        select_device("gpu", "recommend.device")


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_gpu_recommendations_match_cpu(champion):
    layout, tracking, _ = champion
    recommend(RecommendConfig(k=5, device="cpu"), tracking, layout)
    cpu = pq.read_table(recommendations_path(layout)).to_pandas()
    summary = recommend(RecommendConfig(k=5, device="cuda"), tracking, layout)
    gpu = pq.read_table(recommendations_path(layout)).to_pandas()
    assert summary["device"].startswith("cuda")
    agreement = (cpu["item_id"] == gpu["item_id"]).mean()
    assert agreement > 0.98  # TF32/kernel differences may swap near-ties


def test_champion_histories_need_only_the_registry(champion, tmp_path):
    """recommend.histories=champion (the scheduled DAG): the users and histories registered with the
    champion, no features in the work dir; the same recommendations as from those features."""
    from pipeline.core.io import Layout

    layout, tracking, registered = champion
    recommend(RecommendConfig(k=5, device="cpu"), tracking, layout)
    from_features = pq.read_table(recommendations_path(layout)).to_pandas()
    empty = Layout(tmp_path / "work")
    summary = recommend(RecommendConfig(k=5, device="cpu", histories="champion"), tracking, empty)
    from_champion = pq.read_table(recommendations_path(empty)).to_pandas()
    assert not empty.features_dir.exists()
    assert (summary["histories"], summary["version"], summary["users"]) == ("champion", registered["version"],
                                                                             len(load_sequences(layout.features_dir).users))
    key = ["user_id", "rank"]
    assert from_champion.dtypes.to_dict() == from_features.dtypes.to_dict()
    assert from_champion.sort_values(key).reset_index(drop=True)[[*key, "item_id"]].equals(
        from_features.sort_values(key).reset_index(drop=True)[[*key, "item_id"]])
    with pytest.raises(ServingError, match="or set recommend.histories=champion"):
        recommend(RecommendConfig(), tracking, empty)


def test_diversity_weight_reranks_every_users_list_by_mmr(champion):
    """recommend.diversity_weight > 0: each user's list is MMR (pipeline/models/rerank.py) over the champion's top
    candidates of their whole history; no duplicates, no seen items, and more diverse lists than at weight 0."""
    import numpy as np
    import torch

    from pipeline.evaluation.metrics import intra_list_diversity
    from pipeline.models.rerank import candidate_count, mmr_rerank, unit_rows

    layout, tracking, registered = champion
    recommend(RecommendConfig(k=7, batch_size=50, device="cpu"), tracking, layout)
    plain = pq.read_table(recommendations_path(layout)).to_pandas()
    summary = recommend(RecommendConfig(k=7, batch_size=50, device="cpu", diversity_weight=0.5), tracking, layout)
    diverse = pq.read_table(recommendations_path(layout)).to_pandas()
    assert summary["diversity_weight"] == 0.5 and summary["rows"] == len(plain) == len(diverse)

    data = load_sequences(layout.features_dir)
    items = pq.read_table(layout.features_dir / "item_vocab.parquet").to_pandas()
    users = pq.read_table(layout.features_dir / "user_vocab.parquet").to_pandas()
    raw_item = dict(zip(items["index"], items["id"], strict=True))
    index_of = {v: k for k, v in raw_item.items()}
    raw_user = dict(zip(users["index"], users["id"], strict=True))
    rec = Recommender.load(layout.root / registered["path"])
    vectors = unit_rows(rec.model.item_weights())
    by_user = diverse.groupby("user_id")["item_id"].apply(list)
    for row in (0, 17, len(data.users) - 1):
        history = data.items[data.offsets[row] : data.offsets[row + 1]].tolist()
        candidates, scores = rec.recommend([history], k=candidate_count(7, rec.n_items))
        expected, _ = mmr_rerank(candidates, scores, vectors, 7, 0.5)
        got = by_user[raw_user[data.users[row]]]
        assert got == [raw_item[i] for i in expected[0].tolist()]
        assert len(set(got)) == 7 and not {index_of[i] for i in got} & set(history)

    def mean_ild(frame) -> float:
        lists = frame.sort_values(["user_id", "rank"]).groupby("user_id")["item_id"].apply(lambda s: [index_of[i] for i in s])
        return float(intra_list_diversity(torch.tensor(np.array(lists.tolist())), vectors)[0].mean())

    assert mean_ild(diverse) > mean_ild(plain)
