"""Sparse storage of pruned weight matrices: a bitmask (1 bit per entry) plus the non-zero values.

At 50% sparsity an fp32 matrix takes 4.125 instead of 8 bytes per pair of entries; at load
time it is expanded back to a dense tensor (sparse kernels only pay off at much higher
sparsity than the quality allows).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pipeline.models.sasrec import SASRec

MASK_SUFFIX = ".__mask"
VALUES_SUFFIX = ".__values"


def prunable_weights(model: SASRec) -> dict[str, nn.Parameter]:
    """Weight matrices that unstructured pruning thins: every Linear weight and the item table."""
    return {name: p for name, p in model.named_parameters()
            if p.dim() == 2 and (name.endswith(".weight") and ("blocks." in name or name == "item_embedding.weight"))}


def sparsify_state(state: dict[str, torch.Tensor], names: Iterable[str]) -> dict[str, torch.Tensor]:
    """`names` stored as bitmask + non-zero values; everything else unchanged."""
    names = set(names)
    stored = {}
    for name, tensor in state.items():
        if name not in names:
            stored[name] = tensor
            continue
        mask = tensor != 0
        flat = mask.flatten()
        padded = torch.zeros(-(-flat.numel() // 8) * 8, dtype=torch.bool)
        padded[: flat.numel()] = flat
        weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
        stored[name + MASK_SUFFIX] = (padded.view(-1, 8).to(torch.uint8) * weights).sum(1).to(torch.uint8)
        stored[name + VALUES_SUFFIX] = tensor[mask].contiguous()
    return stored


def densify_state(stored: dict[str, torch.Tensor], shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Inverse of `sparsify_state`: `shapes` gives each sparse tensor's dense shape."""
    state = {}
    for name, tensor in stored.items():
        if name.endswith(VALUES_SUFFIX):
            continue
        if not name.endswith(MASK_SUFFIX):
            state[name] = tensor
            continue
        base = name[: -len(MASK_SUFFIX)]
        shape = shapes[base]
        bits = (tensor.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1
        mask = bits.flatten()[: shape.numel()].bool().view(shape)
        values = stored[base + VALUES_SUFFIX]
        if int(mask.sum()) != values.numel():
            raise ValueError(f"{base}: mask has {int(mask.sum())} entries but {values.numel()} values are stored")
        dense = torch.zeros(shape, dtype=values.dtype)
        dense[mask] = values
        state[base] = dense
    return state
