"""Row-wise quantization of embedding tables (one scale and one offset per row).

Item-embedding tables dominate a recommender's size: one row per catalogue
item. Each row is mapped affinely onto the integer grid between its own minimum
and maximum, so a row of small values keeps its resolution whatever the other
rows hold.

- int8: 256 levels, 1 byte per value;
- int4: 16 levels, two values per byte (low nibble = even column).

For a row with range r, the reconstruction error of every value is at most
r / (2 * (levels - 1)), half a quantization step; tests check that bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LEVELS = {8: 256, 4: 16}


@dataclass(frozen=True)
class RowwiseQuantized:
    """codes: uint8 (N, d) for 8 bits, (N, ceil(d/2)) packed for 4 bits; value = code * scale + offset."""

    codes: torch.Tensor
    scale: torch.Tensor  # float32 (N,)
    offset: torch.Tensor  # float32 (N,)
    bits: int
    dim: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.offset))

    def bytes_per_row(self) -> float:
        return self.nbytes / self.codes.shape[0]

    def dequantize(self, rows: torch.Tensor | slice | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float table (or only `rows` of it: an embedding lookup, or a block of rows to score)."""
        codes, scale, offset = (self.codes, self.scale, self.offset) if rows is None else (
            self.codes[rows], self.scale[rows], self.offset[rows])
        values = unpack_int4(codes, self.dim) if self.bits == 4 else codes
        return (values.to(dtype) * scale.to(dtype).unsqueeze(-1) + offset.to(dtype).unsqueeze(-1))

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.codes": self.codes, f"{prefix}.scale": self.scale, f"{prefix}.offset": self.offset}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], prefix: str, bits: int, dim: int) -> RowwiseQuantized:
        return cls(state[f"{prefix}.codes"], state[f"{prefix}.scale"], state[f"{prefix}.offset"], bits, dim)


def quantize_rowwise(table: torch.Tensor, bits: int) -> RowwiseQuantized:
    if bits not in LEVELS:
        raise ValueError(f"bits must be one of {sorted(LEVELS)}, got {bits}")
    if table.dim() != 2:
        raise ValueError(f"expected a 2-D table, got shape {tuple(table.shape)}")
    table = table.detach().float()
    low, high = table.min(dim=1).values, table.max(dim=1).values
    steps = LEVELS[bits] - 1
    # A constant row (range 0, e.g. the padding row) gets scale 1 so codes stay 0 and offset holds it.
    scale = torch.where(high > low, (high - low) / steps, torch.ones_like(high))
    codes = torch.round((table - low.unsqueeze(1)) / scale.unsqueeze(1)).clamp_(0, steps).to(torch.uint8)
    if bits == 4:
        codes = pack_int4(codes)
    return RowwiseQuantized(codes.contiguous(), scale.contiguous(), low.contiguous(), bits, table.shape[1])


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(N, d) values in 0..15 -> (N, ceil(d/2)) bytes, two values per byte."""
    if codes.shape[1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, dim: int) -> torch.Tensor:
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], -1)[..., :dim]
