"""Explanations: faithful to the model (removing the top supporting item costs more than a random one),
the same for every variant, and the gradient method's fallback."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from pipeline.data.sequences import load_sequences
from pipeline.models.coded import code_teacher
from pipeline.models.explain import explain, gradient_weights, occlusion_weights
from pipeline.models.recommender import Recommender
from pipeline.models.sasrec import load_model
from pipeline.models.variants import save_variant
from tests.registry_helpers import build_trained

N_USERS = 200


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    layout = build_trained(tmp_path_factory.mktemp("explain"))
    data = load_sequences(layout.features_dir)
    histories = [data.items[data.offsets[r] : data.offsets[r + 1]].tolist() for r in range(len(data.users))]
    histories = [h for h in histories if len(set(h[-20:])) >= 3][:N_USERS]
    assert len(histories) == N_USERS
    return layout, histories


def _score(rec: Recommender, history: list[int], item: int) -> float:
    return float(rec.scores([history if history else [0]])[0, item]) if history else float("nan")


def _drops(rec: Recommender, histories, method: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per user with a supporting item, the score drop of the top recommendation when its top supporting item is removed, and when a
    random distinct item of the window is removed: measured with `Recommender.scores`, not with explain."""
    items, _ = rec.recommend(histories, k=1)
    explanations = explain(rec, histories, items.tolist(), top_n=1, method=method)
    rng = random.Random(seed)
    top, rand = [], []
    for history, (target,), (because,) in zip(histories, items.tolist(), explanations, strict=True):
        if not because:  # no history item raises this score: nothing to remove
            continue
        window = history[-rec.max_len :]
        full = _score(rec, window, target)
        supporting = because[0][0]
        top.append(full - _score(rec, [i for i in window if i != supporting], target))
        other = rng.choice(sorted(set(window)))
        rand.append(full - _score(rec, [i for i in window if i != other], target))
    return np.array(top), np.array(rand)


def test_removing_the_top_supporting_item_lowers_the_score_more_than_a_random_one(trained):
    layout, histories = trained
    rec = Recommender.load(layout.model_dir("main"))
    top, rand = _drops(rec, histories, "occlusion")
    assert len(top) >= 0.8 * len(histories)  # most recommendations have a supporting item (measured: 174 of 200)
    # Occlusion's weight is the very drop measured here, so its top item is never worse than a random one ...
    assert (top >= rand - 1e-4).all()
    # ... and the margin is clear over the users: a random item barely moves the score.
    assert top.mean() > 2 * rand.mean() and top.mean() - rand.mean() > 3 * rand.std() / np.sqrt(len(rand))
    g_top, g_rand = _drops(rec, histories, "gradient")
    assert g_top.mean() > g_rand.mean()  # gradient x input is informative too, if less exact (see the docstring)
    assert top.mean() >= g_top.mean() - 1e-6


def test_occlusion_weights_are_exact_score_drops(trained):
    layout, histories = trained
    rec = Recommender.load(layout.model_dir("main"))
    sample = histories[:5]
    items, _ = rec.recommend(sample, k=3)
    for history, targets, (candidates, drops) in zip(sample, items.tolist(), occlusion_weights(rec, sample, items.tolist()),
                                                     strict=True):
        window = history[-rec.max_len :]
        assert candidates == list(dict.fromkeys(window))
        for row, removed in enumerate(candidates):
            for column, target in enumerate(targets):
                expected = _score(rec, window, target) - _score(rec, [i for i in window if i != removed], target)
                assert drops[row, column].item() == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("kind", ["int8_table", "int4_table", "lowrank", "pq", "int8"])
def test_every_variant_is_explained_by_its_own_scores(trained, tmp_path, kind):
    layout, histories = trained
    teacher = load_model(layout.model_dir("main"))
    if kind == "pq":
        teacher = code_teacher(teacher, n_subspaces=4, codebook_size=32, seed=0)
    rec = Recommender.load(save_variant(teacher, tmp_path / kind, kind, rank=8 if kind == "lowrank" else None))
    sample = histories[:8]
    items, scores = rec.recommend(sample, k=4)
    explanations = explain(rec, sample, items.tolist(), top_n=2)
    for history, per_item in zip(sample, explanations, strict=True):
        assert len(per_item) == 4 and any(per_item)
        for because in per_item:
            assert all(item in history for item, _ in because) and [w for _, w in because] == sorted(
                (w for _, w in because), reverse=True)
            assert all(w > 0 for _, w in because)
    # The weights are this variant's own score drops (Recommender.scores goes through its lookup and encoder).
    history, target = sample[0][-rec.max_len :], items[0, 0].item()
    for item, weight in explanations[0][0]:
        expected = _score(rec, history, target) - _score(rec, [i for i in history if i != item], target)
        assert weight == pytest.approx(expected, abs=1e-3)


def test_gradient_method_falls_back_to_occlusion_without_gradients(trained, monkeypatch):
    layout, histories = trained
    rec = Recommender.load(layout.model_dir("main"))
    sample = histories[:4]
    items, _ = rec.recommend(sample, k=2)
    assert gradient_weights(rec, sample, items.tolist()) is not None
    original = rec.model.encode_last

    def no_grad_encoder(embedded, lengths):
        with torch.no_grad():
            return original(embedded, lengths)

    monkeypatch.setattr(rec.model, "encode_last", no_grad_encoder)
    assert gradient_weights(rec, sample, items.tolist()) is None
    assert explain(rec, sample, items.tolist(), method="gradient") == explain(rec, sample, items.tolist())


def test_bad_arguments_are_refused(trained):
    layout, histories = trained
    rec = Recommender.load(layout.model_dir("main"))
    with pytest.raises(ValueError, match="method"):
        explain(rec, histories[:1], [[1]], method="shap")
    with pytest.raises(ValueError, match="top_n"):
        explain(rec, histories[:1], [[1]], top_n=0)
    with pytest.raises(ValueError, match="at least one item"):
        explain(rec, [[]], [[1]])
    (single,) = explain(rec, [[5, 5]], [[7, 8]])  # one distinct item: compared with the empty history
    assert len(single) == 2 and all(item == 5 for because in single for item, _ in because)
