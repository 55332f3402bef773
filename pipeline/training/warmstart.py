"""Warm start: initialise a SASRec from a trained one whose catalogue was smaller (incremental updates).

`features.vocab_from` extends the item vocabulary without renumbering: item index i of the old
model is item index i of the new features, and new items take the indices after the old ones.
So the old item table is copied into the first rows of the new, larger table, and the rows of the
new items keep the fresh initialisation of `SASRec` (the padding row stays zero). Every other
tensor must have the same shape in both models: the preset and shape overrides of the run must
match the model it starts from (`train.init_from`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.core.errors import TrainError
from pipeline.models.sasrec import CONFIG_FILE, WEIGHTS_FILE, SASRec

logger = logging.getLogger(__name__)

TABLE_KEY = "item_embedding.weight"
SHAPE_KEYS = ("d_model", "n_layers", "n_heads", "max_len", "ffn_multiplier")


def grow_state(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`new` (a fresh model's state) with every tensor of `old`; the item table's old rows copied in place."""
    if set(old) != set(new):
        raise TrainError(f"warm start: the models' layers differ (only in the old: {sorted(set(old) - set(new))}, "
                         f"only in the new: {sorted(set(new) - set(old))})")
    grown = {}
    for key, fresh in new.items():
        previous = old[key]
        if key == TABLE_KEY:
            if previous.shape[0] > fresh.shape[0] or previous.shape[1:] != fresh.shape[1:]:
                raise TrainError(
                    f"warm start: the old item table {tuple(previous.shape)} does not fit in the new one "
                    f"{tuple(fresh.shape)}: the new vocabulary must extend the old one (features.vocab_from)")
            table = fresh.clone()
            table[: previous.shape[0]] = previous.to(fresh.dtype)
            grown[key] = table
        elif previous.shape != fresh.shape:
            raise TrainError(f"warm start: {key} is {tuple(previous.shape)} in the old model and {tuple(fresh.shape)} here")
        else:
            grown[key] = previous.to(fresh.dtype)
    return grown


def warm_start(model: SASRec, directory: str | Path) -> dict[str, int]:
    """Load the SASRec saved in `directory` into `model`, growing the item table; return what was copied."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not (config_path.exists() and weights_path.exists()):
        raise TrainError(f"train.init_from={directory}: no SASRec model there ({CONFIG_FILE} and {WEIGHTS_FILE} expected)")
    old_cfg = json.loads(config_path.read_text(encoding="utf-8"))
    mismatched = {k: (old_cfg.get(k), getattr(model.cfg, k)) for k in SHAPE_KEYS if old_cfg.get(k) != getattr(model.cfg, k)}
    if mismatched:
        raise TrainError(f"train.init_from={directory}: shape differs (old, new): {mismatched}; use the same preset and overrides")
    old_state = load_file(str(weights_path), device="cpu")
    new_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    model.load_state_dict(grow_state(old_state, new_state))
    info = {"old_items": int(old_cfg["n_items"]), "new_items": model.cfg.n_items - int(old_cfg["n_items"])}
    logger.info("warm start from %s: %d items kept their rows, %d new items", directory, info["old_items"], info["new_items"])
    return info
