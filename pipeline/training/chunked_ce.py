"""Exact full-catalogue cross-entropy in blocks of tokens: memory bounded by the block, not the catalogue.

The dense loss materialises tokens x catalogue logits (at 1M items and 6,400 tokens,
25.6 GB in fp32) and autograd keeps them, their log-softmax and both gradients for the
backward pass. Here the tokens are taken a block at a time, the block sized so that its
logits against the whole catalogue hold at most `block_logits` values. A block's row of
logits is complete, so its log-sum-exp, its loss and its gradient (softmax - one_hot,
formed in place) are final at once: the block's shares of the hidden states' gradient and
of the table's gradient are computed then and there, and the logits are dropped before the
next block. The gradients are kept for `backward`, which only scales them.

Matmul work is that of the dense loss (logits, then their gradient to the hidden states and
to the table: 6 x tokens x d x catalogue), with no logits computed twice and no buffer of
tokens x catalogue written to memory, which is why it measures faster than the dense loss
at every catalogue size (docs/benchmarks.md). It is the fused linear cross-entropy of
Liger-Kernel and the memory bound of cut cross-entropy (arXiv 2409.18721), in plain torch. `train.loss_block_logits` sets the block.
Without autograd (validation, `torch.no_grad`), only the loss is computed.

Column 0 of the item table is padding and never a target, so it is left out of
the softmax, as the dense loss masks it with -inf; its gradient is zero.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def _accumulation_dtype(tensor: torch.Tensor) -> torch.dtype:
    """fp32 for half-precision inputs (a log-sum-exp in bf16 loses the loss), float64 stays float64."""
    return torch.promote_types(tensor.dtype, torch.float32)


def token_blocks(tokens: int, catalogue: int, block_logits: int):
    """Token ranges [start, stop) whose logits over the catalogue hold at most `block_logits` values (one token at least)."""
    per_block = max(1, block_logits // max(catalogue, 1))
    for start in range(0, tokens, per_block):
        yield start, min(start + per_block, tokens)


def _scored_blocks(hidden: torch.Tensor, table: torch.Tensor, targets: torch.Tensor, block_logits: int, acc: torch.dtype):
    """Each block of tokens: (start, stop, its logits over `table` in `acc`, its targets as columns of them, its
    log-sum-exp) and the block's summed loss."""
    for start, stop in token_blocks(hidden.shape[0], table.shape[0], block_logits):
        logits = (hidden[start:stop] @ table.T).to(acc)
        target = (targets[start:stop] - 1).unsqueeze(1)
        lse = torch.logsumexp(logits, dim=1, keepdim=True)
        yield start, stop, logits, target, lse, (lse.squeeze(1) - logits.gather(1, target).squeeze(1)).sum()


def _loss_only(hidden: torch.Tensor, weights: torch.Tensor, targets: torch.Tensor, block_logits: int) -> torch.Tensor:
    acc = _accumulation_dtype(hidden)
    total = torch.zeros((), device=hidden.device, dtype=acc)
    for *_, loss in _scored_blocks(hidden, weights[1:], targets, block_logits, acc):
        total += loss
    return total


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weights: torch.Tensor, targets: torch.Tensor, block_logits: int) -> torch.Tensor:
        acc = _accumulation_dtype(hidden)
        table = weights[1:]
        total = torch.zeros((), device=hidden.device, dtype=acc)
        # Only the gradients autograd will ask for: a frozen table costs no pass over it per block.
        grad_hidden = torch.empty(hidden.shape, device=hidden.device, dtype=acc) if ctx.needs_input_grad[0] else None
        grad_weights = torch.zeros(weights.shape, device=weights.device, dtype=acc) if ctx.needs_input_grad[1] else None
        for start, stop, logits, target, lse, loss in _scored_blocks(hidden, table, targets, block_logits, acc):
            total += loss
            gradient = logits.sub_(lse).exp_()  # softmax, in the logits' own buffer
            gradient.scatter_add_(1, target, torch.full(target.shape, -1.0, device=gradient.device, dtype=acc))
            if grad_hidden is not None:
                grad_hidden[start:stop] = gradient.to(table.dtype) @ table
            if grad_weights is not None:
                grad_weights[1:].addmm_(gradient.T, hidden[start:stop].to(acc))
        ctx.save_for_backward(grad_hidden, grad_weights)
        ctx.dtypes = (hidden.dtype, weights.dtype)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        grads = []
        for grad, dtype in zip(ctx.saved_tensors, ctx.dtypes, strict=True):
            grads.append(None if grad is None else (grad * grad_output.to(grad.dtype)).to(dtype))
        return *grads, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weights: torch.Tensor, targets: torch.Tensor, block_logits: int) -> torch.Tensor:
    """Summed cross-entropy of `targets` (1..n_rows-1) over every non-padding row of `weights`.

    hidden: (tokens, d); weights: (n_rows, d), row 0 padding; equal to
    `F.cross_entropy(hidden @ weights[1:].T, targets - 1, reduction="sum")` and to its gradients.
    At most `block_logits` logits exist at once (a block of tokens against the whole catalogue).
    """
    if hidden.dim() != 2 or weights.dim() != 2 or hidden.shape[1] != weights.shape[1]:
        raise ValueError(f"expected hidden (tokens, d) and weights (rows, d), got {tuple(hidden.shape)} and {tuple(weights.shape)}")
    if block_logits < 1:
        raise ValueError(f"block_logits must be at least 1, got {block_logits}")
    if targets.numel() and (int(targets.min()) < 1 or int(targets.max()) >= weights.shape[0]):
        raise ValueError(f"targets must be item indices in 1..{weights.shape[0] - 1}")
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weights.requires_grad)):
        return _loss_only(hidden, weights, targets, block_logits)
    return _ChunkedCrossEntropy.apply(hidden, weights, targets, block_logits)
