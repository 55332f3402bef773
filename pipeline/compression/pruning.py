"""Magnitude pruning of a SASRec, structured and unstructured, stored physically smaller.

Structured: in every block the attention heads with the smallest weight norm
(their rows of the q/k/v projections plus their columns of the output
projection) and the FFN channels with the smallest norm (row of the first
Linear times column of the second) are removed. The same number is kept in
every block, so the result is again a plain SASRec, only narrower
(`head_dim`/`ffn_dim` in its config): fewer FLOPs and fewer bytes, no masks.

Unstructured: within each remaining weight matrix (the Linear layers and the
item table), the smallest-magnitude share is set to zero; such a matrix is
stored as a bitmask plus its non-zero values (pipeline/models/sparse.py).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from pipeline.models.sasrec import SASRec
from pipeline.models.sparse import prunable_weights


def _kept_count(total: int, sparsity: float) -> int:
    return max(1, round(total * (1.0 - sparsity)))


@torch.no_grad()
def prune_structured(model: SASRec, sparsity: float) -> SASRec:
    """A narrower copy of `model` with `sparsity` of its heads and FFN channels removed in every block."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"structured sparsity must be in [0, 1), got {sparsity}")
    cfg = model.cfg
    head_dim = cfg.attention_dim // cfg.n_heads
    n_heads = _kept_count(cfg.n_heads, sparsity)
    ffn_dim = _kept_count(cfg.hidden_ffn_dim, sparsity)
    pruned = SASRec(dataclasses.replace(cfg, n_heads=n_heads, head_dim=head_dim, ffn_dim=ffn_dim))
    source, target = model.state_dict(), pruned.state_dict()
    for name in target:
        if not name.startswith("blocks."):
            target[name].copy_(source[name])
    for index, block in enumerate(model.blocks):
        prefix = f"blocks.{index}."
        qkv_w = block.attn.qkv.weight.view(3, cfg.n_heads, head_dim, cfg.d_model)
        out_w = block.attn.out.weight.view(cfg.d_model, cfg.n_heads, head_dim)
        head_norm = qkv_w.pow(2).sum(dim=(0, 2, 3)) + out_w.pow(2).sum(dim=(0, 2))
        heads = torch.topk(head_norm, n_heads).indices.sort().values
        target[prefix + "attn.qkv.weight"].copy_(qkv_w[:, heads].reshape(-1, cfg.d_model))
        target[prefix + "attn.qkv.bias"].copy_(block.attn.qkv.bias.view(3, cfg.n_heads, head_dim)[:, heads].reshape(-1))
        target[prefix + "attn.out.weight"].copy_(out_w[:, heads].reshape(cfg.d_model, -1))
        target[prefix + "attn.out.bias"].copy_(block.attn.out.bias)
        up, down = block.ffn[0], block.ffn[2]
        channel_norm = up.weight.norm(dim=1) * down.weight.norm(dim=0)
        channels = torch.topk(channel_norm, ffn_dim).indices.sort().values
        target[prefix + "ffn.0.weight"].copy_(up.weight[channels])
        target[prefix + "ffn.0.bias"].copy_(up.bias[channels])
        target[prefix + "ffn.2.weight"].copy_(down.weight[:, channels])
        target[prefix + "ffn.2.bias"].copy_(down.bias)
        for norm in ("norm1", "norm2"):
            for param in ("weight", "bias"):
                target[f"{prefix}{norm}.{param}"].copy_(source[f"{prefix}{norm}.{param}"])
    pruned.load_state_dict(target)
    return pruned.eval()


@torch.no_grad()
def magnitude_masks(model: SASRec, sparsity: float) -> dict[str, torch.Tensor]:
    """Per matrix, True where a weight survives: all but the `sparsity` share of smallest magnitudes."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"unstructured sparsity must be in [0, 1), got {sparsity}")
    masks = {}
    for name, weight in prunable_weights(model).items():
        n_pruned = int(weight.numel() * sparsity)
        if n_pruned == 0:
            masks[name] = torch.ones_like(weight, dtype=torch.bool)
            continue
        threshold = weight.abs().flatten().kthvalue(n_pruned).values
        mask = weight.abs() > threshold
        masks[name] = mask
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    parameters = dict(model.named_parameters())
    for name, mask in masks.items():
        parameters[name].mul_(mask.to(parameters[name].device))


def sparsity_of(model: SASRec) -> float:
    weights = prunable_weights(model).values()
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
