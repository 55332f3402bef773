"""Exact full-catalogue cross-entropy in chunks of items: memory bounded by the chunk, not the catalogue.

The dense loss materialises tokens x catalogue logits (at 1M items and 6,400 tokens,
25.6 GB in fp32) and autograd keeps them for the backward pass. Here the forward
pass streams over item chunks keeping only a running log-sum-exp per token, and
the backward pass recomputes each chunk's logits to form its slice of
softmax - one_hot(target). Peak extra memory is tokens x chunk logits, whatever
the catalogue size; the price is the logits computed twice (the idea of cut
cross-entropy, arXiv 2409.18721, without a fused kernel).

Column 0 of the item table is padding and never a target, so it is left out of
the softmax, as the dense loss masks it with -inf.
"""

from __future__ import annotations

import torch


def _chunks(n_rows: int, chunk: int):
    """Item ranges [start, stop) of the table, padding row 0 excluded."""
    for start in range(1, n_rows, chunk):
        yield start, min(start + chunk, n_rows)


def _accumulation_dtype(tensor: torch.Tensor) -> torch.dtype:
    """fp32 for half-precision inputs (a log-sum-exp in bf16 loses the loss), float64 stays float64."""
    return torch.promote_types(tensor.dtype, torch.float32)


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weights: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        tokens = hidden.shape[0]
        acc = _accumulation_dtype(hidden)
        running_max = torch.full((tokens,), float("-inf"), device=hidden.device, dtype=acc)
        running_sum = torch.zeros(tokens, device=hidden.device, dtype=acc)
        for start, stop in _chunks(weights.shape[0], chunk):
            logits = (hidden @ weights[start:stop].T).to(acc)
            new_max = torch.maximum(running_max, logits.max(dim=1).values)
            running_sum = running_sum * torch.exp(running_max - new_max) + torch.exp(logits - new_max.unsqueeze(1)).sum(dim=1)
            running_max = new_max
        lse = running_max + torch.log(running_sum)
        target_logits = (hidden * weights[targets]).sum(dim=1).to(acc)
        ctx.save_for_backward(hidden, weights, targets, lse)
        ctx.chunk = chunk
        return (lse - target_logits).sum()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        hidden, weights, targets, lse = ctx.saved_tensors
        acc = _accumulation_dtype(hidden)
        scale = grad_output.to(acc)
        grad_hidden = torch.zeros_like(hidden, dtype=acc)
        grad_weights = torch.zeros_like(weights, dtype=acc) if ctx.needs_input_grad[1] else None
        for start, stop in _chunks(weights.shape[0], ctx.chunk):
            block = weights[start:stop]
            probabilities = torch.exp((hidden @ block.T).to(acc) - lse.unsqueeze(1)) * scale
            grad_hidden += (probabilities.to(block.dtype) @ block).to(acc)
            if grad_weights is not None:
                grad_weights[start:stop] += (probabilities.T.to(hidden.dtype) @ hidden).to(acc)
        # The target's -1 in softmax - one_hot, applied once per token outside the chunk loop.
        grad_hidden -= scale * weights[targets].to(acc)
        if grad_weights is not None:
            grad_weights.index_add_(0, targets, -scale * hidden.to(acc))
            grad_weights = grad_weights.to(weights.dtype)
        return grad_hidden.to(hidden.dtype), grad_weights, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weights: torch.Tensor, targets: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Summed cross-entropy of `targets` (1..n_rows-1) over every non-padding row of `weights`.

    hidden: (tokens, d); weights: (n_rows, d), row 0 padding; equal to
    `F.cross_entropy(hidden @ weights[1:].T, targets - 1, reduction="sum")` and to its gradients.
    """
    if hidden.dim() != 2 or weights.dim() != 2 or hidden.shape[1] != weights.shape[1]:
        raise ValueError(f"expected hidden (tokens, d) and weights (rows, d), got {tuple(hidden.shape)} and {tuple(weights.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    if targets.numel() and (int(targets.min()) < 1 or int(targets.max()) >= weights.shape[0]):
        raise ValueError(f"targets must be item indices in 1..{weights.shape[0] - 1}")
    return _ChunkedCrossEntropy.apply(hidden, weights, targets, chunk)
