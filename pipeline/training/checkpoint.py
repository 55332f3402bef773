"""Training checkpoints: one file, written atomically, holding tensors and plain values only.

`torch.load(..., weights_only=True)` reads them back, so a checkpoint never runs pickled code.
The engine decides what goes in (pipeline/training/engine.py); this module only writes and reads.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.core.errors import TrainError
from pipeline.core.io import atomic_path


def save_checkpoint(path: Path, state: dict) -> None:
    # Atomic: a run killed mid-write leaves the previous epoch's checkpoint, never half a file.
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which, do not guess
        raise TrainError(f"cannot load checkpoint {path}: {err}") from err
