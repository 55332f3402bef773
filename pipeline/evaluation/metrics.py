"""Ranking metrics: the one evaluation every stage that scores a model uses (training, compression, the gate).

Full ranking (the default protocol): every catalogue item is scored, the
user's earlier items are excluded, and the held-out item's rank gives HR@K,
NDCG@K, Recall@K (= HR@K with one held-out item) and MRR; coverage@K is the
share of the catalogue that appears in anybody's top K.

Sampled protocols, as in many papers: the held-out item is ranked against 100
sampled negatives (uniformly or by popularity). They inflate the numbers and
are reported under their own labels, only so results can be compared with
published tables.

Ties are broken at random (seeded): a constant scorer must not get credit
for the order items happen to have in the vocabulary.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import torch
from tqdm import tqdm

from pipeline.data.sequences import Batch, ScoreFn, SequenceData, evaluation_batches, evaluation_rows, seen_items
from pipeline.models.scoring import Exclusion, chunked_top_k, masked_scores, target_rank_counts

logger = logging.getLogger(__name__)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """0-based rank of each target among its row's scores, ties broken uniformly at random."""
    target_scores = scores.gather(1, targets.view(-1, 1))
    greater = (scores > target_scores).sum(1)
    ties = (scores == target_scores).sum(1) - 1  # other items with exactly the target's score
    return _tie_broken(greater, ties, generator)


def _tie_broken(greater: torch.Tensor, ties: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Rank from (items above, other items tied): a random position among the tied items, floor(u * (ties + 1))."""
    if generator is None:
        return greater
    u = torch.rand(len(greater), generator=generator, device="cpu").to(greater.device)
    return greater + torch.floor(u * (ties + 1)).long()


def metrics_from_ranks(ranks: torch.Tensor, ks: Iterable[int]) -> dict[str, torch.Tensor]:
    """Per-example metric values (so batches can be summed) from 0-based ranks."""
    ranks = ranks.double()
    out = {"MRR": 1.0 / (ranks + 1.0)}
    for k in ks:
        hit = (ranks < k).double()
        out[f"HR@{k}"] = hit
        out[f"Recall@{k}"] = hit  # one held-out item per user: recall equals hit rate
        out[f"NDCG@{k}"] = hit / torch.log2(ranks + 2.0)
    return out


def seen_exclusion(data: SequenceData, batch: Batch, split: str) -> Exclusion:
    """Each user's items before `split`'s target, sorted and unique, less the target itself: a
    re-consumed target (possible without de-duplication) stays rankable."""
    batch_rows, items = seen_items(data, batch.rows, split)
    targets = batch.targets.view(-1).cpu().numpy()
    keep = items != targets[batch_rows]
    width = data.n_items + 1
    keys = np.unique(batch_rows[keep].astype(np.int64) * width + items[keep])
    start = np.zeros(len(batch.rows) + 1, np.int64)
    np.cumsum(np.bincount(keys // width, minlength=len(batch.rows)), out=start[1:])
    return Exclusion(start, keys % width)


def evaluate(
    score_fn: ScoreFn,
    data: SequenceData,
    split: str = "test",
    ks: Iterable[int] = (10, 20, 50),
    batch_size: int = 512,
    max_len: int = 200,
    device: torch.device | str = "cpu",
    sampled_negatives: int = 100,
    sampled_strategies: Iterable[str] = ("uniform", "popularity"),
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Metrics of `score_fn` on `split` ("valid" or "test"), averaged over users with a target."""
    ks = sorted(set(int(k) for k in ks))
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    sampled_strategies = tuple(sampled_strategies)
    # Only the popularity-sampled protocol needs the counts; per-epoch validation skips it.
    popularity = torch.from_numpy(data.train_item_counts()).double().to(device) if "popularity" in sampled_strategies else None
    totals: dict[str, float] = {}
    top_items = {k: torch.zeros(data.n_items + 1, dtype=torch.bool, device=device) for k in ks}
    n_users = 0
    batches = evaluation_batches(data, split, batch_size, max_len)
    n_batches = -(-len(evaluation_rows(data, split)) // batch_size)
    with torch.no_grad():
        for batch in tqdm(batches, total=n_batches, desc=f"evaluate[{split}]", unit="batch", disable=not progress or None):
            batch = batch.to(device)
            scores = score_fn(batch).float()
            exclusion = seen_exclusion(data, batch, split)
            # Full ranking from the scores as they are (pipeline/models/scoring.py: one pass on CPU,
            # no masked copy of the batch x catalogue matrix).
            greater, ties = target_rank_counts(scores, batch.targets, exclusion)
            ranks = _tie_broken(greater.to(device), ties.to(device), generator)
            for name, values in metrics_from_ranks(ranks, ks).items():
                totals[f"full/{name}"] = totals.get(f"full/{name}", 0.0) + float(values.sum())
            top, _ = chunked_top_k(lambda start, stop, s=scores: s[:, start:stop], len(batch.rows), scores.shape[1],
                                   max(ks), exclusion, scores.device)
            for k in ks:
                top_items[k][top[:, :k].reshape(-1).to(device)] = True
            if sampled_strategies:
                scores = masked_scores(scores, exclusion)  # what the sampled protocols draw from
            for strategy in sampled_strategies:
                sampled_ranks = _sampled_ranks(scores, batch.targets, popularity, strategy, sampled_negatives, generator)
                for name, values in metrics_from_ranks(sampled_ranks, [k for k in ks if k <= sampled_negatives]).items():
                    key = f"sampled_{strategy}_{sampled_negatives}/{name}"
                    totals[key] = totals.get(key, 0.0) + float(values.sum())
            n_users += len(batch.rows)
    if n_users == 0:
        raise ValueError(f"no users with a {split} target to evaluate")
    metrics = {name: total / n_users for name, total in totals.items()}
    for k in ks:
        metrics[f"full/Coverage@{k}"] = float(top_items[k][1:].sum()) / data.n_items
    metrics["users"] = float(n_users)
    return metrics


def _sampled_ranks(
    scores: torch.Tensor, targets: torch.Tensor, popularity: torch.Tensor | None, strategy: str, n_negatives: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Rank of the target among `n_negatives` sampled items the user has not seen."""
    allowed = torch.isfinite(scores)  # seen items and padding were set to -inf
    allowed.scatter_(1, targets.view(-1, 1), False)
    if strategy == "uniform":
        weights = allowed.double()
    elif strategy == "popularity":
        weights = allowed.double() * (popularity + 1.0)  # +1: never-trained items can still be drawn
    else:
        raise ValueError(f"unknown sampling strategy {strategy!r}")
    weights = weights.cpu()
    n_allowed = int(allowed.sum(1).min())
    draws = torch.multinomial(weights, min(n_negatives, n_allowed), replacement=False, generator=generator).to(scores.device)
    candidates = torch.cat([targets.view(-1, 1), draws], dim=1)
    return target_ranks(scores.gather(1, candidates), torch.zeros_like(targets), generator)
