"""Next-item losses the training engine plugs in: (module, batch) -> (summed loss, token count).

The engine divides the sum by the tokens (pipeline/training/engine.py), so a loss only
sums over the real positions of its batch and says how many there were.

The next-item loss is written once, in `summed_next_item_loss` (full softmax with the padding
column masked with -inf, the chunked exact softmax, sampled softmax with log-Q correction); it is
offered in three shapes, not interchangeable bit for bit with each other:
- `NextItemLoss`, the teacher's, is an nn.Module holding the model, so that DDP and
  torch.compile see one forward. `module_loss` adapts it to the engine.
- `next_item_loss`, the compression fine-tunes' of a full-softmax teacher, is a plain function
  over the full catalogue that drops the padding column; any SASRec-shaped model (pruned,
  low-rank, coded) works.
- `plain_next_item_loss(...)`, the compression fine-tunes' of a teacher trained with another
  loss (a catalogue too large for the full softmax), is `summed_next_item_loss` as a plain function.
`resolve_loss` turns `train.loss: auto` into one of them by catalogue size.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.sequences import Batch
from pipeline.models.sasrec import SASRec
from pipeline.training.chunked_ce import chunked_cross_entropy

# (module, batch) -> (summed loss over real positions, number of real positions)
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, int]]


def resolve_loss(loss: str, n_items: int, chunked_softmax_above_items: int, sampled_softmax_above_items: int | None) -> str:
    """`train.loss` as trained: `auto` is full_softmax up to `chunked_softmax_above_items` items, chunked_softmax
    above, and sampled_softmax above `sampled_softmax_above_items` (None: never).

    The first two compute the same exact loss. The blocked loss measures faster than the dense one from a few
    thousand items on CPU and needs a fraction of its memory at any size; up to about 1,000 items the two are level
    (docs/benchmarks.md, benchmarks/train_speed.py --mode loss-scaling), and the dense one is the simpler. The exact
    loss costs FLOPs in proportion to the catalogue and sampled softmax does not: past the second threshold the
    exact loss's small gain in quality costs many times the wall time (docs/benchmarks.md, "Sampled against exact
    softmax").
    """
    if loss != "auto":
        return loss
    if sampled_softmax_above_items is not None and n_items > sampled_softmax_above_items:
        return "sampled_softmax"
    return "chunked_softmax" if n_items > chunked_softmax_above_items else "full_softmax"


class NextItemLoss(nn.Module):
    """Wraps the model so DDP sees one forward: (inputs, targets) -> summed loss."""

    def __init__(self, model: SASRec, loss: str, n_negatives: int, sampling_logq: torch.Tensor | None, block_logits: int,
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
        self.block_logits = block_logits
        self.register_buffer("sampling_logq", sampling_logq if sampling_logq is not None else torch.zeros(0), persistent=False)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden = self.model(inputs)
        mask = targets != 0
        # Real positions only: padding costs no FLOPs.
        return summed_next_item_loss(hidden[mask], self.model.item_weights(), targets[mask], self.loss,
                                     self.n_negatives, self.sampling_logq, self.block_logits, self.sparse_items)


def _at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits (autocast) go through the softmax in fp32; fp32 and fp64 stay as they are."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def summed_next_item_loss(hidden: torch.Tensor, weights: torch.Tensor, positives: torch.Tensor, loss: str,
                          n_negatives: int, sampling_logq: torch.Tensor | None, block_logits: int,
                          sparse_items: bool = False) -> torch.Tensor:
    """The summed next-item loss of `hidden` (tokens x d) against the catalogue `weights` (row 0 padding)."""
    if loss == "full_softmax":
        logits = hidden @ weights.T
        logits[:, 0] = float("-inf")  # padding is never the next item
        return F.cross_entropy(_at_least_float32(logits), positives, reduction="sum")
    if loss == "chunked_softmax":  # the same loss without tokens x catalogue logits in memory
        return chunked_cross_entropy(hidden, weights, positives, block_logits)
    if loss != "sampled_softmax" or sampling_logq is None:
        raise ValueError(f"unknown loss {loss!r} (or sampled_softmax without sampling probabilities)")
    # Sampled softmax, negatives shared by the batch, drawn by popularity.
    negatives = torch.multinomial(sampling_logq.exp(), n_negatives, replacement=True)
    # sparse_items: the rows of positives and negatives are looked up with F.embedding(sparse=True), so
    # (with the model's sparse input embedding) the table's gradient is a sparse tensor of the touched
    # rows, which SparseAdam updates (pipeline/training/engine.py).
    rows = (lambda index: F.embedding(index, weights, sparse=True)) if sparse_items else weights.__getitem__
    return sampled_softmax(hidden, rows(positives), rows(negatives), positives, negatives, sampling_logq)


def sampled_softmax(hidden: torch.Tensor, positive_vectors: torch.Tensor, negative_vectors: torch.Tensor,
                    positives: torch.Tensor, negatives: torch.Tensor, sampling_logq: torch.Tensor) -> torch.Tensor:
    """Summed sampled-softmax loss of `hidden` (tokens, d) given the vectors of its positives and of the shared
    negatives; also the loss of the sharded item table (pipeline/training/sharded.py), which looks them up itself.

    Log-Q correction subtracts each sampled item's log sampling probability so the estimate is unbiased;
    a negative that is the token's own positive is masked out.
    """
    pos_logit = (hidden * positive_vectors).sum(-1) - sampling_logq[positives]
    neg_logits = hidden @ negative_vectors.T - sampling_logq[negatives]
    neg_logits = neg_logits.masked_fill(negatives.view(1, -1) == positives.view(-1, 1), float("-inf"))
    logits = _at_least_float32(torch.cat([pos_logit.unsqueeze(1), neg_logits], dim=1))
    return F.cross_entropy(logits, torch.zeros(len(positives), dtype=torch.long, device=logits.device), reduction="sum")


def sampling_log_probabilities(train_item_counts: np.ndarray) -> torch.Tensor:
    """log Q(item) for sampled softmax: training popularity plus one (every item can be drawn), padding never."""
    counts = torch.from_numpy(train_item_counts).double() + 1.0
    counts[0] = 0.0
    return (counts / counts.sum()).log().float()


def module_loss(module: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """The loss of a `NextItemLoss` (or its DDP / compiled wrapper); the tokens are the batch's real positions."""
    return module(batch.inputs, batch.targets), int(batch.lengths.sum())


def next_item_loss(model: SASRec, batch: Batch) -> tuple[torch.Tensor, int]:
    hidden = model(batch.inputs)
    mask = batch.targets != 0
    logits = model.logits(hidden[mask])[:, 1:]  # column 0 is padding, never a next item
    return F.cross_entropy(logits, batch.targets[mask] - 1, reduction="sum"), int(mask.sum())


def plain_next_item_loss(loss: str, n_negatives: int, sampling_logq: torch.Tensor | None, block_logits: int) -> LossFn:
    """The compression fine-tunes' loss when the teacher was not trained with the full softmax.

    A catalogue the teacher trained with sampled softmax (or the chunked exact loss) is too large
    for `next_item_loss`'s tokens x catalogue logits, so its variants are fine-tuned with the same
    loss: any SASRec-shaped model (coded, pruned, low-rank) works, as for `next_item_loss`.
    """
    def fine_tune_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        hidden = model(batch.inputs)
        mask = batch.targets != 0
        logq = sampling_logq.to(hidden.device) if sampling_logq is not None else None
        return (summed_next_item_loss(hidden[mask], model.item_weights(), batch.targets[mask], loss, n_negatives, logq,
                                      block_logits), int(mask.sum()))
    return fine_tune_loss
