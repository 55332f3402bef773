"""Next-item losses the training engine plugs in: (module, batch) -> (summed loss, token count).

The engine divides the sum by the tokens (pipeline/training/engine.py), so a loss only
sums over the real positions of its batch and says how many there were.

Two next-item losses exist and are not interchangeable bit for bit:
- `NextItemLoss`, the teacher's, is an nn.Module holding the model, so that DDP and
  torch.compile see one forward; it offers full softmax (padding column masked with -inf)
  and sampled softmax with log-Q correction. `module_loss` adapts it to the engine.
- `next_item_loss`, the compression fine-tunes', is a plain function over the full
  catalogue that drops the padding column; any SASRec-shaped model (pruned, low-rank) works.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.sequences import Batch
from pipeline.models.sasrec import SASRec
from pipeline.training.chunked_ce import chunked_cross_entropy

# (module, batch) -> (summed loss over real positions, number of real positions)
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, int]]


def resolve_loss(loss: str, n_items: int, chunked_softmax_above_items: int) -> str:
    """`train.loss` as trained: `auto` is full_softmax up to `chunked_softmax_above_items` items, chunked_softmax above.

    Both compute the same exact loss; the threshold is where the dense logits' memory and time stop paying
    off on the measured machine (docs/benchmarks.md, benchmarks/train_speed.py --mode loss-scaling).
    """
    if loss != "auto":
        return loss
    return "chunked_softmax" if n_items > chunked_softmax_above_items else "full_softmax"


class NextItemLoss(nn.Module):
    """Wraps the model so DDP sees one forward: (inputs, targets) -> summed loss."""

    def __init__(self, model: SASRec, loss: str, n_negatives: int, sampling_logq: torch.Tensor | None, chunk_items: int = 8192,
                 sparse_items: bool = False):
        super().__init__()
        if loss not in ("full_softmax", "chunked_softmax", "sampled_softmax"):
            raise ValueError(f"unknown loss {loss!r} (resolve 'auto' with resolve_loss first)")
        if sparse_items and loss != "sampled_softmax":
            raise ValueError(f"sparse item gradients need sampled_softmax: {loss} touches every item row")
        self.model = model
        self.loss = loss
        # Sampled softmax only: the table rows of positives and negatives are looked up with
        # F.embedding(sparse=True), so (with the model's sparse input embedding) the table's gradient
        # is a sparse tensor of the touched rows, which SparseAdam updates (pipeline/training/engine.py).
        self.sparse_items = sparse_items
        self.n_negatives = n_negatives
        self.chunk_items = chunk_items
        self.register_buffer("sampling_logq", sampling_logq if sampling_logq is not None else torch.zeros(0), persistent=False)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden = self.model(inputs)
        mask = targets != 0
        hidden, positives = hidden[mask], targets[mask]  # real positions only: padding costs no FLOPs
        weights = self.model.item_weights()
        if self.loss == "full_softmax":
            logits = hidden @ weights.T
            logits[:, 0] = float("-inf")  # padding is never the next item
            return F.cross_entropy(logits.float(), positives, reduction="sum")
        if self.loss == "chunked_softmax":  # the same loss without tokens x catalogue logits in memory
            return chunked_cross_entropy(hidden, weights, positives, self.chunk_items)
        # Sampled softmax, negatives shared by the batch, drawn by popularity; log-Q correction
        # subtracts each sampled item's log sampling probability so the estimate is unbiased.
        negatives = torch.multinomial(self.sampling_logq.exp(), self.n_negatives, replacement=True)
        rows = (lambda index: F.embedding(index, weights, sparse=True)) if self.sparse_items else weights.__getitem__
        pos_logit = (hidden * rows(positives)).sum(-1) - self.sampling_logq[positives]
        neg_logits = hidden @ rows(negatives).T - self.sampling_logq[negatives]
        neg_logits = neg_logits.masked_fill(negatives.view(1, -1) == positives.view(-1, 1), float("-inf"))
        logits = torch.cat([pos_logit.unsqueeze(1), neg_logits], dim=1).float()
        return F.cross_entropy(logits, torch.zeros(len(positives), dtype=torch.long, device=logits.device), reduction="sum")


def module_loss(module: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """The loss of a `NextItemLoss` (or its DDP / compiled wrapper); the tokens are the batch's real positions."""
    return module(batch.inputs, batch.targets), int(batch.lengths.sum())


def next_item_loss(model: SASRec, batch: Batch) -> tuple[torch.Tensor, int]:
    hidden = model(batch.inputs)
    mask = batch.targets != 0
    logits = model.logits(hidden[mask])[:, 1:]  # column 0 is padding, never a next item
    return F.cross_entropy(logits, batch.targets[mask] - 1, reduction="sum"), int(mask.sum())
