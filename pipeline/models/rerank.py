"""Diversity re-ranking: maximal marginal relevance (MMR) over a model's top-N candidates.

A pure function of the candidates (items and scores, best first, as `Recommender.recommend` and the
scorers of pipeline/models/scoring.py return them) and the model's own item vectors; batch
recommendations and the served model call it (pipeline/serving/), the diversity benchmark measures
its accuracy / diversity trade-off (benchmarks/diversity_tradeoff.py, docs/benchmarks.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Candidates re-ranked per requested item: MMR picks k of the model's top CANDIDATES_PER_K * k.
CANDIDATES_PER_K = 5


def candidate_count(k: int, n_items: int) -> int:
    """How many of the model's top items MMR chooses k from: CANDIDATES_PER_K * k, at most the catalogue."""
    return max(k, min(CANDIDATES_PER_K * k, n_items))


def unit_rows(table: torch.Tensor) -> torch.Tensor:
    """`table` (n_rows, d) as float32 rows of unit L2 norm (cosine = dot product); an all-zero row (padding) stays zero."""
    return F.normalize(table.detach().float(), dim=1)


def mmr_rerank(items: torch.Tensor, scores: torch.Tensor, unit_vectors: torch.Tensor, k: int, weight: float,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The k of each row's candidates chosen greedily by maximal marginal relevance.

    items, scores: (B, N) candidates per row, best first; index 0 or score -inf marks an empty slot.
    unit_vectors: (n_items + 1, d) unit rows (`unit_rows` of the model's item table).
    weight: lambda in [0, 1].

    Relevance is min-max normalised per row over its candidates, r_i = (s_i - min s) / (max s - min s)
    (r_i = 1 when all candidates score alike). Step t picks, among the candidates not chosen yet,

        argmax_i  (1 - lambda) * r_i  -  lambda * max_{j in S} cos(v_i, v_j)

    where S holds the items chosen at steps before t and the max over an empty S is 0 (the first
    pick is the most relevant item); ties go to the better-scored candidate. lambda = 0 returns the
    candidates' first k unchanged; lambda = 1 picks, after the first, the item least similar to the
    chosen ones. Returns (items (B, k), the model's own scores of those items), in MMR order (so the
    scores need not decrease); a row with fewer than k candidates ends in index 0 with score -inf.
    An item is never chosen twice, and nothing outside the candidates is returned.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"the diversity weight must be between 0 and 1, got {weight}")
    n_rows, n_candidates = items.shape
    if not 1 <= k <= n_candidates:
        raise ValueError(f"k must be between 1 and the {n_candidates} candidates, got {k}")
    if weight == 0.0:
        return items[:, :k], scores[:, :k]
    eligible = (items > 0) & torch.isfinite(scores)
    values = scores.double()
    low = values.masked_fill(~eligible, float("inf")).min(1, keepdim=True).values
    high = values.masked_fill(~eligible, float("-inf")).max(1, keepdim=True).values
    span = high - low
    relevance = torch.where(span > 0, (values - low) / span.clamp_min(1e-300), torch.ones_like(values))
    relevance = relevance.masked_fill(~eligible, 0.0)
    vectors = unit_vectors.to(items.device)[items].float()  # (B, N, d)
    similarities = torch.bmm(vectors, vectors.transpose(1, 2)).double()  # (B, N, N) cosines, one batched GEMM
    rows = torch.arange(n_rows, device=items.device)
    available = eligible.clone()
    max_similarity = torch.zeros_like(values)  # to the chosen items; 0 while none is chosen
    chosen_items = torch.zeros((n_rows, k), dtype=items.dtype, device=items.device)
    chosen_scores = torch.full((n_rows, k), float("-inf"), dtype=scores.dtype, device=items.device)
    for step in range(k):  # k vectorised steps over the whole batch
        gain = ((1.0 - weight) * relevance - weight * max_similarity).masked_fill(~available, float("-inf"))
        pick = gain.argmax(1)  # the first maximum: the better-scored candidate on ties
        found = available[rows, pick]
        chosen_items[:, step] = torch.where(found, items[rows, pick], torch.zeros_like(pick))
        chosen_scores[:, step] = torch.where(found, scores[rows, pick], torch.full_like(scores[:, 0], float("-inf")))
        available[rows, pick] = False
        similarity = similarities[rows, pick]  # (B, N): every candidate's cosine to the item just chosen
        # the max over S: the first pick's similarity replaces the empty set's 0 (a row with nothing
        # left to pick is changed too, harmlessly: it has no candidate to rank)
        max_similarity = similarity if step == 0 else torch.maximum(max_similarity, similarity)
    return chosen_items, chosen_scores
