"""Training checkpoints: one file, written atomically, holding tensors and plain values only.

`torch.load(..., weights_only=True)` reads them back, so a checkpoint never runs pickled code.
The engine decides what goes in (pipeline/training/engine.py); this module writes and reads them,
and says how a checkpoint differs from the run about to resume it (`config_differences`,
`shape_differences`), so that a run never loads weights of another shape or configuration.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.core.errors import TrainError
from pipeline.core.io import atomic_path

# Train keys a resumed run may change: how long and where it trains, not what (more epochs continue a run).
RESUMABLE_CHANGES = ("epochs", "early_stopping_patience", "device", "compile", "num_threads", "baselines", "bpr", "run_name")
# Train keys that leave the SASRec teacher's weights as they are: compress compares the others with train.json.
NOT_TEACHER_KEYS = ("device", "compile", "num_threads", "baselines", "bpr", "run_name")


def save_checkpoint(path: Path, state: dict) -> None:
    # Atomic: a run killed mid-write leaves the previous epoch's checkpoint, never half a file.
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, mmap: bool = False) -> dict:
    """The checkpoint at `path`; `mmap=True` maps its tensors instead of reading them (cheap to inspect)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # a truncated or foreign file: say which, do not guess
        raise TrainError(f"cannot load checkpoint {path}: {err}") from err


def _flat(tree: object, prefix: str = "") -> dict[str, object]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, object] = {}
    for key, value in tree.items():
        flat.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def config_differences(recorded: dict, current: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """'key: X there, Y now' (recorded, current) for every dotted key whose value differs; keys under `ignore` are skipped."""
    before, after = _flat(recorded), _flat(current)
    skipped = lambda key: any(key == i or key.startswith(f"{i}.") for i in ignore)  # noqa: E731
    missing = object()
    return [f"{key}: {before.get(key, 'absent')!r} there, {after.get(key, 'absent')!r} now"
            for key in sorted(set(before) | set(after))
            if not skipped(key) and before.get(key, missing) != after.get(key, missing)]


def shape_differences(saved: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    """How the tensors of a saved state dict differ from the model's: missing, unexpected, or of another shape."""
    problems = [f"{name}: {tuple(saved[name].shape)} there, {tuple(tensor.shape)} now"
                for name, tensor in expected.items() if name in saved and saved[name].shape != tensor.shape]
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing:
        problems.append(f"tensors missing there: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"tensors not in this model: {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    return problems


def checkpoint_meta(checkpoint: dict) -> dict | None:
    """The plain values the engine saved with the checkpoint (EngineSettings.checkpoint_meta), if any."""
    return json.loads(checkpoint["meta_json"]) if "meta_json" in checkpoint else None


def checkpoint_history(checkpoint: dict) -> list[dict]:
    """The per-epoch records of the run a checkpoint belongs to, up to its last finished epoch."""
    return json.loads(checkpoint["history_json"])
