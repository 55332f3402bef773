"""The chunked exact cross-entropy equals the dense one, value and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.training.chunked_ce import chunked_cross_entropy, token_blocks


def _inputs(tokens=37, rows=101, dim=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, dim, generator=g, dtype=dtype, requires_grad=True)
    weights = torch.randn(rows, dim, generator=g, dtype=dtype, requires_grad=True)
    targets = torch.randint(1, rows, (tokens,), generator=g)
    return hidden, weights, targets


def _dense(hidden, weights, targets):
    return F.cross_entropy(hidden @ weights[1:].T, targets - 1, reduction="sum")


# 100 items: blocks of 1 token (1 and 100 logits), 3, 36 and 37 tokens (the whole batch, once or with room to spare).
@pytest.mark.parametrize("block_logits", [1, 100, 300, 3600, 3700, 10**6])
def test_loss_and_gradients_equal_the_dense_loss_in_float64(block_logits):
    hidden, weights, targets = _inputs()
    dense = _dense(hidden, weights, targets)
    grad_hidden, grad_weights = torch.autograd.grad(dense, (hidden, weights))
    chunked = chunked_cross_entropy(hidden, weights, targets, block_logits)
    chunked_hidden, chunked_weights = torch.autograd.grad(chunked, (hidden, weights))
    torch.testing.assert_close(chunked, dense, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(chunked_hidden, grad_hidden, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(chunked_weights, grad_weights, rtol=1e-10, atol=1e-12)
    assert float(chunked_weights[0].abs().max()) == 0.0  # padding row: never in the softmax


def test_gradcheck_with_a_scaled_upstream_gradient():
    hidden, weights, targets = _inputs(tokens=5, rows=13, dim=4)
    assert torch.autograd.gradcheck(lambda h, w: 0.5 * chunked_cross_entropy(h, w, targets, 24), (hidden, weights))


def test_only_the_gradient_asked_for_is_returned_and_no_grad_gives_the_same_loss():
    hidden, weights, targets = _inputs()
    dense = _dense(hidden, weights, targets)
    expected, expected_weights = torch.autograd.grad(dense, (hidden, weights))
    frozen = weights.detach()
    (got,) = torch.autograd.grad(chunked_cross_entropy(hidden, frozen, targets, 250), (hidden,))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    (got_weights,) = torch.autograd.grad(chunked_cross_entropy(hidden.detach(), weights, targets, 250), (weights,))
    torch.testing.assert_close(got_weights, expected_weights, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        value = chunked_cross_entropy(hidden, weights, targets, 250)
    assert not value.requires_grad
    torch.testing.assert_close(value, dense.detach(), rtol=1e-12, atol=1e-10)


def test_the_loss_called_twice_in_one_graph_accumulates_both_gradients():
    """Each call keeps its own gradients (a second forward must not overwrite the first's)."""
    hidden, weights, targets = _inputs()
    other = torch.randint(1, weights.shape[0], targets.shape, generator=torch.Generator().manual_seed(5))
    dense = _dense(hidden, weights, targets) + 2 * _dense(hidden, weights, other)
    expected = torch.autograd.grad(dense, (hidden, weights))
    chunked = chunked_cross_entropy(hidden, weights, targets, 300) + 2 * chunked_cross_entropy(hidden, weights, other, 300)
    for got, want in zip(torch.autograd.grad(chunked, (hidden, weights)), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_under_bfloat16_autocast_the_loss_and_gradients_stay_float32_and_close_to_the_fp32_ones():
    """The engine's bf16 autocast: matmuls in bf16, the log-sum-exp and the gradients accumulated in fp32."""
    hidden, weights, targets = _inputs(dtype=torch.float32)
    dense = _dense(hidden, weights, targets)
    expected = torch.autograd.grad(dense, (hidden, weights))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = chunked_cross_entropy(hidden, weights, targets, 500)
    got = torch.autograd.grad(value, (hidden, weights))
    assert value.dtype == torch.float32 and all(g.dtype == torch.float32 for g in got)
    torch.testing.assert_close(value, dense, rtol=2e-2, atol=0.5)
    for g, want in zip(got, expected, strict=True):
        torch.testing.assert_close(g, want, rtol=5e-2, atol=5e-2)


def test_large_logits_stay_finite_in_float32():
    hidden, weights, targets = _inputs(dtype=torch.float32)
    with torch.no_grad():
        hidden *= 30  # logits in the hundreds: a naive exp overflows
    dense = _dense(hidden, weights, targets)
    chunked = chunked_cross_entropy(hidden, weights, targets, 1600)
    assert torch.isfinite(chunked)
    torch.testing.assert_close(chunked, dense, rtol=1e-5, atol=1e-3)


def test_bad_inputs_are_named():
    hidden, weights, targets = _inputs()
    with pytest.raises(ValueError, match="targets must be item indices in 1..100"):
        chunked_cross_entropy(hidden, weights, torch.zeros_like(targets), 100)
    with pytest.raises(ValueError, match="block_logits must be at least 1"):
        chunked_cross_entropy(hidden, weights, targets, 0)
    with pytest.raises(ValueError, match="expected hidden"):
        chunked_cross_entropy(hidden, weights[:, :3], targets, 100)


@pytest.mark.parametrize(("tokens", "catalogue", "block_logits"),
                         [(37, 100, 1), (37, 100, 350), (6400, 20_000, 52_428_800), (5, 10**6, 10)])
def test_blocks_cover_every_token_once_within_the_logits_bound(tokens, catalogue, block_logits):
    blocks = list(token_blocks(tokens, catalogue, block_logits))
    assert [start for start, _ in blocks] == [0] + [stop for _, stop in blocks[:-1]] and blocks[-1][1] == tokens
    assert all((stop - start) * catalogue <= block_logits or stop - start == 1 for start, stop in blocks)
