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


class NextItemLoss(nn.Module):
    """Wraps the model so DDP sees one forward: (inputs, targets) -> summed loss."""

    def __init__(self, model: SASRec, loss: str, n_negatives: int, sampling_logq: torch.Tensor | None, chunk_items: int = 8192):
        super().__init__()
        self.model = model
        self.loss = loss
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
        return sampled_softmax(hidden, weights[positives], weights[negatives], positives, negatives, self.sampling_logq)


def sampled_softmax(hidden: torch.Tensor, positive_vectors: torch.Tensor, negative_vectors: torch.Tensor,
                    positives: torch.Tensor, negatives: torch.Tensor, sampling_logq: torch.Tensor) -> torch.Tensor:
    """Summed sampled-softmax loss of `hidden` (tokens, d) given the vectors of its positives and of the shared
    negatives; also the loss of the sharded item table (pipeline/training/sharded.py), which looks them up itself."""
    pos_logit = (hidden * positive_vectors).sum(-1) - sampling_logq[positives]
    neg_logits = hidden @ negative_vectors.T - sampling_logq[negatives]
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
