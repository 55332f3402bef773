"""CodedSASRec's top-K through its codes equals the dense top-K of its reconstructed table."""

from __future__ import annotations

import pytest
import torch

from pipeline.models import coded
from pipeline.models.coded import code_teacher
from pipeline.models.recommender import Recommender
from pipeline.models.sasrec import SASRec, SASRecConfig
from pipeline.models.scoring import dense_top_k


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    teacher = SASRec(SASRecConfig(n_items=3000, d_model=16, n_layers=1, n_heads=2, max_len=12)).eval()
    return code_teacher(teacher, n_subspaces=4, codebook_size=64, seed=0).eval()


@pytest.mark.parametrize("path", ["codes", "pruned", "dense"])
def test_top_k_through_the_codes_equals_the_dense_top_k(model, monkeypatch, path):
    monkeypatch.setattr(coded, "POSTINGS_MIN_ROWS", 1 if path == "pruned" else 10**9)
    monkeypatch.setattr(coded, "DENSE_SCAN_MAX_ROWS", 10**9 if path == "dense" else 0)
    model._cached_postings = None
    assert (model._postings() is not None) == (path == "pruned")
    users = torch.randn(5, 16)
    exclude = [[1, 2, 3], [], [5] * 3, list(range(1, 500)), [7]]
    dense = model.item_weights().detach()
    for k in (1, 10, 100):
        items, scores = model.top_k(users, k, exclude)
        ref_items, ref_scores = dense_top_k(users, dense, k, exclude)
        torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)
        assert (items == ref_items).float().mean() > 0.98  # only float near-ties may swap
        for row, seen in enumerate(exclude):
            assert not set(items[row].tolist()) & (set(seen) | {0})


def test_recommender_serves_the_coded_model_like_its_dense_reconstruction(model):
    histories = [[1, 2, 3], [10, 20, 30, 40], [2999]]
    items, _ = Recommender(model).recommend(histories, k=10)
    scores = model.logits(model.last_hidden(*Recommender(model)._batch(histories))).detach()
    scores[:, 0] = float("-inf")
    for row, history in enumerate(histories):
        scores[row, history] = float("-inf")
    assert torch.equal(items, torch.topk(scores, 10).indices)


def test_the_dense_scan_follows_the_codebooks(model, monkeypatch):
    """A fine-tune steps the codebooks in place: the cached reconstruction must not serve stale scores."""
    monkeypatch.setattr(coded, "DENSE_SCAN_MAX_ROWS", 10**9)
    users = torch.randn(3, 16)
    before, _ = model.top_k(users, 10)
    original = model.table.codebooks.detach().clone()
    try:
        with torch.no_grad():
            model.table.codebooks.mul_(-1.0)  # every score flips sign: the best become the worst
        after, _ = model.top_k(users, 10)
        reference, _ = dense_top_k(users, model.item_weights().detach(), 10)
        assert torch.equal(after, reference) and not torch.equal(after, before)
    finally:
        with torch.no_grad():
            model.table.codebooks.copy_(original)


def test_inference_lookups_use_the_cached_table_and_training_the_codes(model, monkeypatch):
    monkeypatch.setattr(coded, "DENSE_SCAN_MAX_ROWS", 10**9)
    items = torch.tensor([[0, 5, 17, 2999]])
    with torch.no_grad():
        served = model.embed(items)
    live = model.item_codes().reconstruct(items)
    torch.testing.assert_close(served, live.detach(), rtol=0, atol=0)
    assert live.requires_grad and not served.requires_grad  # with gradients on, the lookup stays differentiable
    assert float(served[0, 0].abs().max()) == 0.0  # padding reads as zero
