"""The one device selector: a params `device` setting (auto | cpu | cuda) -> a torch device."""

from __future__ import annotations

import os

import torch

from pipeline.core.errors import ConfigError


def select_device(choice: str, setting: str = "device") -> torch.device:
    """CUDA when asked for or when `auto` finds it, else the CPU.

    `setting` names the params key (e.g. "train.device") so the error says which one to change.
    Under torchrun each process takes the GPU of its LOCAL_RANK.
    """
    if choice not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"{setting}={choice!r}: choose auto, cpu or cuda")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{setting}=cuda but no CUDA device is available; use auto or cpu")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
