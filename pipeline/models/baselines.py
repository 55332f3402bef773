"""Baselines every report shows beside the Transformer: popularity and BPR matrix factorisation."""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline.core.config import BPRConfig
from pipeline.data.sequences import Batch, ScoreFn, SequenceData

logger = logging.getLogger(__name__)


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


def train_bpr(data: SequenceData, cfg: BPRConfig, seed: int, device: torch.device) -> BPRMF:
    """BPR on the training interactions with one uniformly sampled negative per positive."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    users, items = data.train_pairs()
    model = BPRMF(data.n_user_index, data.n_items, cfg.dim).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    users_t, items_t = torch.from_numpy(users), torch.from_numpy(items)
    for epoch in tqdm(range(cfg.epochs), desc="bpr", unit="epoch", disable=None):
        order = torch.from_numpy(rng.permutation(len(users)))
        negatives = torch.from_numpy(rng.integers(1, data.n_items + 1, len(users)))
        total = 0.0
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            u, i, j = users_t[idx].to(device), items_t[idx].to(device), negatives[idx].to(device)
            user_vec, pos_vec, neg_vec = model.user(u), model.item(i), model.item(j)
            margin = (user_vec * (pos_vec - neg_vec)).sum(1)
            reg = cfg.weight_decay * (user_vec.pow(2).sum() + pos_vec.pow(2).sum() + neg_vec.pow(2).sum()) / len(idx)
            loss = -F.logsigmoid(margin).mean() + reg
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        logger.debug("bpr epoch %d loss %.4f", epoch, total / len(users))
    return model.eval()


def bpr_scores(model: BPRMF) -> ScoreFn:
    def score(batch: Batch) -> torch.Tensor:
        return model.score_users(batch.users)

    return score


def popularity_scores(counts: np.ndarray) -> ScoreFn:
    table = torch.from_numpy(counts.astype(np.float32))

    def score(batch: Batch) -> torch.Tensor:
        return table.to(batch.inputs.device).expand(len(batch.rows), -1)

    return score
