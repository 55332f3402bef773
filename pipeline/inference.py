"""One inference interface: top-K items over the full catalogue for a batch of user histories.

Evaluation, batch recommendations and serving all go through `Recommender`, so
a model is scored the same way everywhere. Histories are item vocabulary
indices (1..n_items) in time order; mapping raw IDs to indices is the caller's
job (the vocabularies live in data/features/).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from pipeline.model import PADDING_INDEX, SASRec

MAX_K = 1000


class Recommender:
    def __init__(self, model: SASRec, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.n_items = model.cfg.n_items
        self.max_len = model.cfg.max_len

    @classmethod
    def load(cls, directory: str | Path, device: torch.device | str = "cpu") -> Recommender:
        """A teacher or any compressed variant directory."""
        from pipeline.variants import load_variant

        return cls(load_variant(Path(directory), device), device)

    def _batch(self, histories: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded inputs of each history's last max_len items, and their lengths."""
        if not histories:
            raise ValueError("histories is empty: pass at least one user history")
        lengths = torch.tensor([min(len(h), self.max_len) for h in histories], dtype=torch.long)
        if (lengths == 0).any():
            raise ValueError("every history needs at least one item (unknown users need a fallback)")
        inputs = torch.zeros(len(histories), int(lengths.max()), dtype=torch.long)
        for row, history in enumerate(histories):
            recent = torch.as_tensor(list(history)[-self.max_len :], dtype=torch.long)
            if recent.min() < 1 or recent.max() > self.n_items:
                raise ValueError(f"history {row} has item indices outside 1..{self.n_items}")
            inputs[row, : len(recent)] = recent
        return inputs, lengths

    @torch.no_grad()
    def scores(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        """(B, n_items + 1) next-item scores; column 0 (padding) is -inf."""
        inputs, lengths = self._batch(histories)
        scores = self.model.score(inputs.to(self.device), lengths.to(self.device)).float()
        scores[:, PADDING_INDEX] = float("-inf")
        return scores

    @torch.no_grad()
    def recommend(
        self, histories: Sequence[Sequence[int]], k: int = 10, exclude_seen: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k item indices and scores per history, best first; seen items excluded by default."""
        if not 1 <= k <= min(MAX_K, self.n_items):
            raise ValueError(f"k must be between 1 and {min(MAX_K, self.n_items)}, got {k}")
        scores = self.scores(histories)
        if exclude_seen:
            rows = torch.cat([torch.full((len(h),), i, dtype=torch.long) for i, h in enumerate(histories)])
            items = torch.cat([torch.as_tensor(list(h), dtype=torch.long) for h in histories])
            scores[rows.to(scores.device), items.to(scores.device)] = float("-inf")
        top = torch.topk(scores, k, dim=1)
        return top.indices.cpu(), top.values.cpu()
