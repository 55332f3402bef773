"""Training of the baselines every report shows beside the Transformer: popularity counts and BPR-MF.

The models and their score functions live in pipeline/models/baselines.py; this module fits
them on the training interactions and saves them beside the teacher (models/<run>/baselines/).

BPR keeps its own short loop instead of the training engine (pipeline/training/engine.py):
none of the engine's machinery applies to it. It trains on (user, positive, sampled negative)
triples drawn from one numpy Generator across epochs, not on the engine's bucketed next-item
sequence batches; its loss is already a per-batch mean plus an L2 term, not a token sum;
it uses Adam, not AdamW; and it has no validation, early stopping, best weights, checkpoint,
AMP or DDP. Routing it through the engine would add a batch source, a normalisation and an
optimizer switch used by BPR alone, for a loop of twenty lines.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from pipeline.core.config import BPRConfig, TrainConfig
from pipeline.core.io import atomic_path
from pipeline.data.sequences import SequenceData
from pipeline.models.baselines import BPRMF

logger = logging.getLogger(__name__)

BASELINES_DIR = "baselines"


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


def train_baselines(cfg: TrainConfig, data: SequenceData, run_dir: Path, seed: int, device: torch.device) -> dict[str, float]:
    """Popularity counts and BPR-MF, saved as safetensors beside the main model; returns seconds per baseline."""
    out_dir = run_dir / BASELINES_DIR
    shutil.rmtree(out_dir, ignore_errors=True)  # no stale baseline from an earlier config survives
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds = {}
    names = set(cfg.baselines) | ({cfg.model} - {"sasrec"})
    if "popularity" in names:
        started = time.perf_counter()
        with atomic_path(out_dir / "popularity.safetensors") as tmp:
            save_file({"counts": torch.from_numpy(data.train_item_counts())}, str(tmp))
        seconds["popularity"] = time.perf_counter() - started
    if "bpr" in names:
        started = time.perf_counter()
        model = train_bpr(data, cfg.bpr, seed, device)
        with atomic_path(out_dir / "bpr.safetensors") as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
        seconds["bpr"] = time.perf_counter() - started
    return seconds
