"""Baselines every report shows beside the Transformer: popularity and BPR matrix factorisation.

The models and their score functions; their training is in pipeline/training/baselines.py.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipeline.data.sequences import Batch, ScoreFn


class BPRMF(nn.Module):
    """Matrix factorisation trained with Bayesian Personalised Ranking (Rendle et al., 2009)."""

    def __init__(self, n_users: int, n_items: int, dim: int):
        super().__init__()
        self.user = nn.Embedding(n_users + 1, dim)
        self.item = nn.Embedding(n_items + 1, dim)
        nn.init.normal_(self.user.weight, std=0.1)
        nn.init.normal_(self.item.weight, std=0.1)

    def score_users(self, users: torch.Tensor) -> torch.Tensor:
        return self.user(users) @ self.item.weight.T


def bpr_scores(model: BPRMF) -> ScoreFn:
    def score(batch: Batch) -> torch.Tensor:
        return model.score_users(batch.users)

    return score


def popularity_scores(counts: np.ndarray) -> ScoreFn:
    table = torch.from_numpy(counts.astype(np.float32))

    def score(batch: Batch) -> torch.Tensor:
        return table.to(batch.inputs.device).expand(len(batch.rows), -1)

    return score
