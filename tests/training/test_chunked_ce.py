"""The chunked exact cross-entropy equals the dense one, value and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.training.chunked_ce import chunked_cross_entropy


def _inputs(tokens=37, rows=101, dim=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, dim, generator=g, dtype=dtype, requires_grad=True)
    weights = torch.randn(rows, dim, generator=g, dtype=dtype, requires_grad=True)
    targets = torch.randint(1, rows, (tokens,), generator=g)
    return hidden, weights, targets


def _dense(hidden, weights, targets):
    return F.cross_entropy(hidden @ weights[1:].T, targets - 1, reduction="sum")


@pytest.mark.parametrize("chunk", [1, 7, 100, 101, 4096])
def test_loss_and_gradients_equal_the_dense_loss_in_float64(chunk):
    hidden, weights, targets = _inputs()
    dense = _dense(hidden, weights, targets)
    grad_hidden, grad_weights = torch.autograd.grad(dense, (hidden, weights))
    chunked = chunked_cross_entropy(hidden, weights, targets, chunk=chunk)
    chunked_hidden, chunked_weights = torch.autograd.grad(chunked, (hidden, weights))
    torch.testing.assert_close(chunked, dense, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(chunked_hidden, grad_hidden, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(chunked_weights, grad_weights, rtol=1e-10, atol=1e-12)
    assert float(chunked_weights[0].abs().max()) == 0.0  # padding row: never in the softmax


def test_gradcheck_with_a_scaled_upstream_gradient():
    hidden, weights, targets = _inputs(tokens=5, rows=13, dim=4)
    assert torch.autograd.gradcheck(lambda h, w: 0.5 * chunked_cross_entropy(h, w, targets, chunk=4), (hidden, weights))


def test_large_logits_stay_finite_in_float32():
    hidden, weights, targets = _inputs(dtype=torch.float32)
    with torch.no_grad():
        hidden *= 30  # logits in the hundreds: a naive exp overflows
    dense = _dense(hidden, weights, targets)
    chunked = chunked_cross_entropy(hidden, weights, targets, chunk=16)
    assert torch.isfinite(chunked)
    torch.testing.assert_close(chunked, dense, rtol=1e-5, atol=1e-3)


def test_bad_inputs_are_named():
    hidden, weights, targets = _inputs()
    with pytest.raises(ValueError, match="targets must be item indices in 1..100"):
        chunked_cross_entropy(hidden, weights, torch.zeros_like(targets))
    with pytest.raises(ValueError, match="chunk must be at least 1"):
        chunked_cross_entropy(hidden, weights, targets, chunk=0)
    with pytest.raises(ValueError, match="expected hidden"):
        chunked_cross_entropy(hidden, weights[:, :3], targets)
