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

Beyond accuracy (`BEYOND_ACCURACY`, on each user's top-K list of the split, seen items excluded;
computed when `evaluate` is given an item-vector space):

- ILD@K, intra-list diversity: 1 - the mean cosine similarity over the list's item pairs, in one
  fixed item-vector space for every model (the evaluate stage passes the teacher's item embedding
  table), so lists of different models are compared in the same space; lists with fewer than two
  items have no pairs and are left out of the mean.
- Novelty@K: the mean self-information -log2(p_i) of the listed items, p_i = the item's share of the
  training interactions (an item never seen in training counts as seen once: finite, the highest value).
- Coverage@K: the share of the catalogue in at least one user's list.
- Gini@K: the Gini index of exposure (how many lists each item appears in) over every catalogue
  item, recommended or not: 0 when every item is listed equally often, (n - 1) / n when one item
  takes all the exposure.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.core.errors import EvaluateError
from pipeline.data.sequences import Batch, ScoreFn, SequenceData, evaluation_batches, evaluation_rows, seen_items
from pipeline.models.scoring import Exclusion, chunked_top_k, kernels_for, target_rank_counts

logger = logging.getLogger(__name__)

# The beyond-accuracy metrics of the top-K lists, declared once (reports take names and meanings from here).
BEYOND_ACCURACY = {
    "ILD": "intra-list diversity: 1 - mean pairwise cosine of the listed items' vectors (one fixed item space)",
    "Novelty": "mean self-information -log2(training popularity share) of the listed items, bits",
    "Coverage": "share of the catalogue in at least one list",
    "Gini": "Gini index of exposure over every catalogue item (0: equal exposure, near 1: one item for all)",
}


def rank_counts(scores: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(items scored above each row's target, other items tied with it), for `_tie_broken`."""
    target_scores = scores.gather(1, targets.view(-1, 1))
    greater = (scores > target_scores).sum(1)
    ties = (scores == target_scores).sum(1) - 1  # other items with exactly the target's score
    return greater, ties


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """0-based rank of each target among its row's scores, ties broken uniformly at random."""
    return _tie_broken(*rank_counts(scores, targets), generator)


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


def intra_list_diversity(lists: torch.Tensor, unit_vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per list (B, k) of item indices: (1 - mean cosine over its item pairs, whether it has a pair).

    Padding entries (index 0) are not items and take part in no pair; `unit_vectors` are rows of unit norm.
    """
    valid = lists > 0
    vectors = unit_vectors[lists] * valid.unsqueeze(-1)  # (B, k, d), padding slots zeroed
    cosines = vectors @ vectors.transpose(1, 2)  # (B, k, k)
    n = valid.sum(1).double()
    pairs = n * (n - 1)  # ordered pairs i != j
    off_diagonal = cosines.sum((1, 2)).double() - (vectors * vectors).sum((1, 2)).double()
    has_pair = pairs > 0
    return torch.where(has_pair, 1.0 - off_diagonal / pairs.clamp_min(1.0), torch.zeros_like(n)), has_pair


def self_information(train_counts: np.ndarray | torch.Tensor) -> torch.Tensor:
    """-log2(share of the training interactions) per item index, an unseen item counted once; padding 0."""
    counts = torch.as_tensor(train_counts).double().clone()
    counts[0] = 0.0
    total = float(counts.sum())
    if total <= 0:
        raise EvaluateError("no training interactions: novelty needs the items' training popularity")
    info = -torch.log2(counts.clamp_min(1.0) / total)
    info[0] = 0.0
    return info


def novelty(lists: torch.Tensor, information: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per list (B, k): (mean self-information of its items, whether it has an item); padding ignored."""
    valid = lists > 0
    n = valid.sum(1).double()
    total = (information.to(lists.device)[lists] * valid).sum(1)
    return total / n.clamp_min(1.0), n > 0


def gini_index(exposure: np.ndarray | torch.Tensor) -> float:
    """Gini index of non-negative exposure counts, one per catalogue item (every item, listed or not).

    G = sum_i (2i - n - 1) x_(i) / (n sum x), x sorted ascending, i = 1..n: 0 for equal exposure,
    (n - 1) / n when one item has it all; 0 when nothing was exposed.
    """
    x = torch.as_tensor(exposure).double().flatten().sort().values
    n, total = x.numel(), float(x.sum())
    if n == 0 or total == 0:
        return 0.0
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(((2 * i - n - 1) * x).sum() / (n * total))


class ListMetrics:
    """Beyond-accuracy metrics (and, given targets, HR/NDCG) of top-K lists, accumulated batch by batch.

    `add(lists, targets)` takes (B, >= max(ks)) item indices best first (0 = an empty slot);
    `result()` gives `full/ILD@k`, `full/Novelty@k`, `full/Coverage@k`, `full/Gini@k` for each k
    (ILD only with `unit_vectors`), and `full/HR@k`, `full/NDCG@k` of the lists when targets were given.
    """

    def __init__(self, ks: Iterable[int], n_items: int, train_counts: np.ndarray | torch.Tensor,
                 unit_vectors: torch.Tensor | None = None):
        self.ks = sorted(set(int(k) for k in ks))
        self.n_items = n_items
        self.information = self_information(train_counts)
        if unit_vectors is not None and unit_vectors.shape[0] != n_items + 1:
            raise EvaluateError(f"item vectors have {unit_vectors.shape[0]} rows, the catalogue {n_items} items "
                             "plus padding: use the table of a model trained on these features")
        self.unit_vectors = None if unit_vectors is None else unit_vectors.detach().float().cpu()
        self.exposure = {k: torch.zeros(n_items + 1, dtype=torch.float64) for k in self.ks}
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}
        self.n_lists = 0

    def _add(self, name: str, values: torch.Tensor, valid: torch.Tensor) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(values[valid].sum())
        self.counts[name] = self.counts.get(name, 0.0) + float(valid.sum())

    def add(self, lists: torch.Tensor, targets: torch.Tensor | None = None) -> None:
        lists = lists.long().cpu()
        for k in self.ks:
            top = lists[:, :k]
            self.exposure[k] += torch.bincount(top.reshape(-1), minlength=self.n_items + 1).double()
            self._add(f"Novelty@{k}", *novelty(top, self.information))
            if self.unit_vectors is not None:
                self._add(f"ILD@{k}", *intra_list_diversity(top, self.unit_vectors))
        if targets is not None:
            hits = lists[:, : max(self.ks)] == targets.view(-1, 1).long().cpu()
            # the target's 0-based position in the list; a miss ranks past every cut-off
            ranks = torch.where(hits.any(1), hits.double().argmax(1), torch.full((len(lists),), float(self.n_items + 1)))
            for name, values in metrics_from_ranks(ranks, self.ks).items():
                if name != "MRR":  # the list's MRR would be truncated at its length
                    self._add(name, values, torch.ones(len(values), dtype=torch.bool))
        self.n_lists += len(lists)

    def result(self) -> dict[str, float]:
        out = {f"full/{name}": total / self.counts[name] if self.counts[name] else 0.0 for name, total in self.sums.items()}
        for k, exposure in self.exposure.items():
            out[f"full/Coverage@{k}"] = float((exposure[1:] > 0).sum()) / self.n_items
            out[f"full/Gini@{k}"] = gini_index(exposure[1:])
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


def validation_sample(data: SequenceData, n_users: int | None, seed: int, split: str = "valid") -> np.ndarray | None:
    """A fixed sample of `n_users` of the users with a `split` target (positions in `data`, sorted), drawn
    with `seed`; None (every user) when n_users is None or covers them all."""
    rows = evaluation_rows(data, split)
    if n_users is None or n_users >= len(rows):
        return None
    return np.sort(np.random.default_rng(seed).choice(rows, n_users, replace=False))


def sample_negatives(
    exclusion: Exclusion, targets: torch.Tensor, n_items: int, n_negatives: int, generator: torch.Generator,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, n) items sampled without replacement among each user's allowed items (1..n_items, not the
    target, not excluded), uniformly or, given `weights` ((n_items + 1,), weights[0] = 0), by weight;
    n = min(n_negatives, the fewest allowed items of any user in the batch).

    By rejection: draws from all items (torch.randint, or torch.multinomial with replacement on
    the weights), the first n distinct allowed ones kept (`first_allowed_draws`); users still short
    draw again, twice as many each round. Seeded by `generator` alone (one stream per protocol).
    """
    targets_np = targets.view(-1).cpu().numpy().astype(np.int64)
    n_users = len(targets_np)
    inside = (exclusion.rows >= 1) & (exclusion.rows <= n_items)
    excluded_per_user = np.bincount(np.repeat(np.arange(n_users), np.diff(exclusion.start))[inside], minlength=n_users)
    n = min(n_negatives, int((n_items - 1 - excluded_per_user).min())) if n_users else 0
    chosen = np.zeros((n_users, max(n, 0)), np.int64)
    if n <= 0:
        return torch.from_numpy(chosen)
    filled = np.zeros(n_users, np.int64)
    kernels = kernels_for(targets.cpu())
    per_user = 2 * n + 16
    while True:
        short = np.flatnonzero(filled < n)
        if len(short) == 0:
            return torch.from_numpy(chosen)
        size = len(short) * per_user
        draws = (torch.randint(1, n_items + 1, (size,), generator=generator) if weights is None
                 else torch.multinomial(weights, size, replacement=True, generator=generator)).numpy()
        draws_start = np.zeros(n_users + 1, np.int64)
        counts = np.zeros(n_users, np.int64)
        counts[short] = per_user
        np.cumsum(counts, out=draws_start[1:])
        if kernels is not None:
            kernels.run_blocks(kernels.first_allowed_draws, 1, 1, draws, draws_start, targets_np, exclusion.rows,
                               exclusion.start, chosen, filled)
        else:
            _first_allowed_draws(draws, draws_start, targets_np, exclusion, chosen, filled)
        per_user *= 2


def _first_allowed_draws(draws: np.ndarray, draws_start: np.ndarray, targets: np.ndarray, exclusion: Exclusion,
                         chosen: np.ndarray, filled: np.ndarray) -> None:
    """The rejection step of `sample_negatives` in plain Python (no numba; the kernel's reference)."""
    for user in range(len(targets)):
        excluded = set(exclusion.rows[exclusion.start[user]:exclusion.start[user + 1]].tolist())
        kept = chosen[user, : filled[user]].tolist()
        for item in draws[draws_start[user]:draws_start[user + 1]].tolist():
            if len(kept) == chosen.shape[1]:
                break
            if item != 0 and item != targets[user] and item not in excluded and item not in kept:
                kept.append(item)
        chosen[user, : len(kept)] = kept
        filled[user] = len(kept)


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
    beyond_accuracy: bool = False,
    item_vectors: torch.Tensor | None = None,
    desc: str | None = None,
    rows: np.ndarray | None = None,
    coverage: bool = True,
) -> dict[str, float]:
    """Metrics of `score_fn` on `split` ("valid" or "test"), averaged over users with a target
    (or over `rows`, positions in `data` of users with one: a sample of them). Without `coverage`
    no top-k lists are taken (no `full/Coverage@k`; per-epoch validation needs NDCG and HR only).

    With `beyond_accuracy`, also the beyond-accuracy metrics of each user's top-k lists for every k
    in `ks` (`BEYOND_ACCURACY`: novelty against the training popularity, Gini index of exposure, and
    ILD when `item_vectors` ((n_items + 1, d), e.g. the teacher's item table) give the vector space).

    Random streams: the full ranking's ties are broken with a generator seeded `seed` (the same
    draws whatever sampled protocols run, so `full/*` are the same with and without them); the
    sampled protocols draw from their own, seeded `seed + 1`.
    """
    ks = sorted(set(int(k) for k in ks))
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    sampled_generator = torch.Generator().manual_seed(seed + 1)
    sampled_strategies = tuple(sampled_strategies)
    for strategy in sampled_strategies:
        if strategy not in ("uniform", "popularity"):
            raise ValueError(f"unknown sampling strategy {strategy!r}")
    train_counts = data.train_item_counts() if ("popularity" in sampled_strategies or beyond_accuracy) else None
    popularity = None
    if "popularity" in sampled_strategies:  # +1: never-trained items can still be drawn; padding never
        popularity = torch.from_numpy(train_counts).double() + 1.0
        popularity[0] = 0.0
    totals: dict[str, float] = {}
    top_items = {k: torch.zeros(data.n_items + 1, dtype=torch.bool) for k in ks}
    lists = None if not beyond_accuracy else ListMetrics(
        ks, data.n_items, train_counts, None if item_vectors is None else F.normalize(item_vectors.detach().float(), dim=1))
    sampled_ks = [k for k in ks if k <= sampled_negatives]
    rows = evaluation_rows(data, split) if rows is None else np.asarray(rows, np.int64)
    n_users = len(rows)
    if n_users == 0:
        raise ValueError(f"no users with a {split} target to evaluate")
    # Scored in order of history length, so a batch pads only to its own longest window (most
    # histories are short; padding every batch to the longest costs most of the forward pass)...
    window = np.minimum(data.prefix_length(split)[rows], max_len)
    order = np.argsort(window, kind="stable")
    greater, ties = np.zeros(n_users, np.int64), np.zeros(n_users, np.int64)
    top_lists = np.zeros((n_users, max(ks)) if coverage or lists is not None else (0, 0), np.int64)  # none for validation
    sampled = {strategy: (np.zeros(n_users, np.int64), np.zeros(n_users, np.int64)) for strategy in sampled_strategies}
    with torch.no_grad():
        batches = zip(range(0, n_users, batch_size), evaluation_batches(data, split, batch_size, max_len, rows[order]))
        for start, batch in tqdm(batches, total=-(-n_users // batch_size), desc=desc or f"evaluate[{split}]",
                                 unit="batch", disable=not progress or None, leave=False):
            positions = order[start:start + len(batch.rows)]
            scores = score_fn(batch.to(device)).float()
            exclusion = seen_exclusion(data, batch, split)
            # Full ranking from the scores as they are (pipeline/models/scoring.py: one pass on CPU,
            # no masked copy of the batch x catalogue matrix).
            above, tied = target_rank_counts(scores, batch.targets.to(scores.device), exclusion)
            greater[positions], ties[positions] = above.cpu().numpy(), tied.cpu().numpy()
            if coverage or lists is not None:
                top, _ = chunked_top_k(lambda first, stop, s=scores: s[:, first:stop], len(batch.rows), scores.shape[1],
                                       max(ks), exclusion, scores.device)
                top_lists[positions] = top.cpu().numpy()
            for strategy, (sampled_greater, sampled_ties) in sampled.items():
                negatives = sample_negatives(exclusion, batch.targets, data.n_items, sampled_negatives, sampled_generator,
                                             popularity if strategy == "popularity" else None)
                candidates = scores.gather(1, torch.cat([batch.targets.view(-1, 1), negatives], dim=1).to(scores.device))
                above, tied = rank_counts(candidates, torch.zeros(len(candidates), dtype=torch.long, device=candidates.device))
                sampled_greater[positions], sampled_ties[positions] = above.cpu().numpy(), tied.cpu().numpy()
    # ... and aggregated in user order, batch by batch: the same random draws and float sums as
    # scoring in user order would give.

    def add(prefix: str, ranks: torch.Tensor, cut_offs: list[int]) -> None:
        for name, values in metrics_from_ranks(ranks, cut_offs).items():
            totals[f"{prefix}/{name}"] = totals.get(f"{prefix}/{name}", 0.0) + float(values.sum())

    top_lists = torch.from_numpy(top_lists)
    for start in range(0, n_users, batch_size):
        part = slice(start, start + batch_size)
        add("full", _tie_broken(torch.from_numpy(greater[part]), torch.from_numpy(ties[part]), generator), ks)
        for k in ks if coverage else ():
            top_items[k][top_lists[part, :k].reshape(-1)] = True
        if lists is not None:
            lists.add(top_lists[part])
        for strategy, (sampled_greater, sampled_ties) in sampled.items():
            add(f"sampled_{strategy}_{sampled_negatives}",
                _tie_broken(torch.from_numpy(sampled_greater[part]), torch.from_numpy(sampled_ties[part]), sampled_generator),
                sampled_ks)
    metrics = {name: total / n_users for name, total in totals.items()}
    for k in ks if coverage else ():
        metrics[f"full/Coverage@{k}"] = float(top_items[k][1:].sum()) / data.n_items
    if lists is not None:
        metrics.update(lists.result())
    metrics["users"] = float(n_users)
    return metrics
