"""Why an item was recommended: the history items that most support it, computed from the model itself.

`explain(recommender, histories, items)` gives, for each user and each recommended item,
the history items (vocabulary indices) with the largest positive weight, best first:
"because you interacted with X, Y".

Method: occlusion (leave-one-out). An item's weight is the drop of the recommended
item's score when every occurrence of that item is removed from the history the model
sees (its last max_len items), everything else unchanged:
weight(x -> i) = score(i | history) - score(i | history without x). It is exact for what
the model does, works for every variant the `Recommender` loads (quantized, pruned, low
rank, PQ item codes, ONNX encoders: it only calls the model's forward pass), and costs one
forward pass over a (D + 1)-row batch per user (D distinct items in the window), batched
across users. A history of one item is compared with the empty history (the padding
token alone). Items older than the window do not influence the score and are not listed.

`method="gradient"` (gradient x input on the input item vectors, one backward pass) is
kept as the cheaper alternative; it falls back to occlusion for a model without gradients.
Measured with `python benchmarks/explain_methods.py --rounds 3` (1 thread): on the trained
tiny model, removing the top supporting item lowers the top recommendation's score by 0.67
on average with occlusion and 0.39 with gradient x input (a random history item: 0.06-0.07);
at the default size (small preset, 3,000 items, 256 users x top-10, histories of 50) occlusion
takes 12.2 s and gradient x input 5.8 s. Occlusion is the default: 1.7x the faithfulness for
2.1x the time (about 50 ms per user on one thread, fine for a request; a batch run with
`recommend.explain` costs that per user).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from pipeline.models.recommender import Recommender
from pipeline.models.sasrec import PADDING_INDEX

logger = logging.getLogger(__name__)

Method = Literal["occlusion", "gradient"]
METHODS: tuple[str, ...] = ("occlusion", "gradient")
DEFAULT_TOP_N = 3
ROWS_PER_PASS = 4096  # forward-pass rows at once: bounds activation memory for long histories x many users

# Per user, per recommended item: [(history item index, weight), ...], largest weight first.
Explanation = list[tuple[int, float]]


def _window(recommender: Recommender, history: Sequence[int]) -> list[int]:
    window = [int(i) for i in list(history)[-recommender.max_len :]]
    if not window:
        raise ValueError("every history needs at least one item to explain a recommendation")
    if min(window) < 1 or max(window) > recommender.n_items:
        raise ValueError(f"history item indices must be within 1..{recommender.n_items}")
    return window


def _padded(rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [r if r else [PADDING_INDEX] for r in rows]  # the empty history: the padding token alone
    width = max(len(r) for r in rows)
    inputs = torch.tensor([r + [PADDING_INDEX] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
    return inputs, torch.tensor([len(r) for r in rows], dtype=torch.long, device=device)


def _target_vectors(recommender: Recommender, items: Sequence[Sequence[int]]) -> torch.Tensor:
    """(B, k, d) output vectors of the recommended items: the shared item table's rows, via the variant's lookup."""
    targets = torch.tensor([list(map(int, row)) for row in items], dtype=torch.long, device=recommender.device)
    return recommender.model.embed(targets).float()


@torch.inference_mode()
def occlusion_weights(recommender: Recommender, histories: Sequence[Sequence[int]],
                      items: Sequence[Sequence[int]]) -> list[tuple[list[int], torch.Tensor]]:
    """Per user: the distinct window items and their (D, k) score drops for the k `items` when each is removed."""
    windows = [_window(recommender, h) for h in histories]
    distinct = [list(dict.fromkeys(w)) for w in windows]
    rows: list[list[int]] = []
    owner: list[int] = []
    for user, (window, candidates) in enumerate(zip(windows, distinct, strict=True)):
        rows.append(window)
        rows.extend([i for i in window if i != removed] for removed in candidates)
        owner.extend([user] * (len(candidates) + 1))
    targets = _target_vectors(recommender, items)
    scores = []
    for start in range(0, len(rows), ROWS_PER_PASS):
        inputs, lengths = _padded(rows[start : start + ROWS_PER_PASS], recommender.device)
        users = recommender.model.last_hidden(inputs, lengths).float()
        who = torch.tensor(owner[start : start + ROWS_PER_PASS], device=recommender.device)
        scores.append(torch.einsum("rd,rkd->rk", users, targets[who]))
    all_scores = torch.cat(scores).cpu()
    out, row = [], 0
    for candidates in distinct:
        full, removed = all_scores[row], all_scores[row + 1 : row + 1 + len(candidates)]
        out.append((candidates, full.unsqueeze(0) - removed))
        row += len(candidates) + 1
    return out


def gradient_weights(recommender: Recommender, histories: Sequence[Sequence[int]],
                     items: Sequence[Sequence[int]]) -> list[tuple[list[int], torch.Tensor]] | None:
    """Gradient x input per distinct window item ((D, k) per user, summed over its positions), or None when
    the model gives no gradients (the caller falls back to occlusion)."""
    model = recommender.model
    windows = [_window(recommender, h) for h in histories]
    k = len(items[0])
    try:
        with torch.enable_grad():
            inputs, lengths = _padded(windows, recommender.device)
            embedded = model.embed(inputs).detach().float().repeat_interleave(k, dim=0).requires_grad_(True)
            users = model.encode_last(embedded, lengths.repeat_interleave(k))  # the torch graph (ONNX holds the same)
            if not users.requires_grad:
                return None
            targets = _target_vectors(recommender, items).detach().reshape(-1, embedded.shape[-1])
            (grad,) = torch.autograd.grad((users.float() * targets).sum(), embedded)
    except (RuntimeError, NotImplementedError) as err:  # e.g. a quantized kernel without a backward
        logger.info("no gradients through this model (%s): falling back to occlusion", err)
        return None
    contribution = (grad * embedded.detach()).sum(-1).view(len(windows), k, -1).cpu()  # (B, k, width)
    out = []
    for user, window in enumerate(windows):
        candidates = list(dict.fromkeys(window))
        position = torch.tensor(window)
        weights = torch.stack([contribution[user, :, : len(window)][:, position == c].sum(-1) for c in candidates])
        out.append((candidates, weights))
    return out


def explain(recommender: Recommender, histories: Sequence[Sequence[int]], items: Sequence[Sequence[int]],
            top_n: int = DEFAULT_TOP_N, method: Method = "occlusion") -> list[list[Explanation]]:
    """For each history and each of its recommended `items`, the top_n history items with a positive weight,
    largest first, as (item index, weight); see the module docstring. A row of `items` may be shorter than
    the others (a user who has seen almost everything) or empty (nothing to explain)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if top_n < 1:
        raise ValueError(f"top_n must be at least 1, got {top_n}")
    if len(histories) != len(items):
        raise ValueError(f"{len(histories)} histories but {len(items)} rows of recommended items")
    rows = [r for r, row in enumerate(items) if len(row)]
    result: list[list[Explanation]] = [[] for _ in items]
    if not rows:
        return result
    width = max(len(items[r]) for r in rows)
    # Shorter rows padded with their own first item (explained, then dropped): one batch for every user.
    padded = [list(map(int, items[r])) + [int(items[r][0])] * (width - len(items[r])) for r in rows]
    chosen = [histories[r] for r in rows]
    weights = gradient_weights(recommender, chosen, padded) if method == "gradient" else None
    if weights is None:
        weights = occlusion_weights(recommender, chosen, padded)
    for r, (candidates, drops) in zip(rows, weights, strict=True):
        for column in drops.T.tolist()[: len(items[r])]:  # one recommended item
            ranked = sorted(zip(candidates, column, strict=True), key=lambda pair: -pair[1])
            result[r].append([(item, float(w)) for item, w in ranked[:top_n] if w > 0])
    return result


def explain_results(recommender: Recommender, histories: Sequence[Sequence[int]],
                    results: Sequence[tuple[list[int], list[float], str]], raw_ids: Callable[[list[int]], list],
                    ks: Sequence[int] | None = None) -> list[tuple[list[list], list[list[float]]]]:
    """`explain` for recommendation results (indices, scores, source) as the serving code has them: per result,
    per recommended item (its first ks[r]), the raw IDs of the supporting items and their weights. Results
    not from the model (the popularity fallback) get no explanations."""
    ks = ks or [len(indices) for indices, _, _ in results]
    items = [list(indices[:k]) if source == "model" else [] for (indices, _, source), k in zip(results, ks, strict=True)]
    return [([raw_ids([i for i, _ in s]) for s in per_item], [[w for _, w in s] for s in per_item])
            for per_item in explain(recommender, histories, items)]
