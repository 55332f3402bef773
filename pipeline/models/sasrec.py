"""SASRec: a causal self-attention sequential recommender.

Pre-LayerNorm Transformer blocks on `scaled_dot_product_attention`, learned
positions, and one item-embedding table shared by the input lookup and the
output scoring (logits = hidden @ item_embedding.T).

Sequences are right-padded (index 0 = padding): with a causal mask a real
position never attends to the padding after it, so `is_causal=True` alone is a
correct mask and SDPA can use its fused kernels; padded positions are ignored
by the loss and by `last_hidden`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.core.io import atomic_path, write_json
from pipeline.models.scoring import ExcludeArg, dense_top_k

PADDING_INDEX = 0


@dataclass(frozen=True)
class SASRecConfig:
    n_items: int  # catalogue size, padding excluded (vocabulary indices 1..n_items)
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    max_len: int = 50
    ffn_multiplier: int = 4
    dropout: float = 0.2
    # Set only by structured pruning, which removes attention heads and FFN channels;
    # None keeps the dense shape (n_heads heads of d_model / n_heads; ffn_multiplier * d_model).
    head_dim: int | None = None
    ffn_dim: int | None = None

    @property
    def attention_dim(self) -> int:
        return self.n_heads * (self.head_dim or self.d_model // self.n_heads)

    @property
    def hidden_ffn_dim(self) -> int:
        return self.ffn_dim or self.ffn_multiplier * self.d_model

    def to_dict(self) -> dict:
        return asdict(self)


# Presets set the shape; n_items comes from the data. `large` has 101M parameters in its blocks and
# positions alone (8 x 12.6M + 0.2M), so it is over 100M on any catalogue, item table included.
PRESETS: dict[str, dict] = {
    "small": {"d_model": 64, "n_layers": 2, "n_heads": 2, "max_len": 50},
    "medium": {"d_model": 256, "n_layers": 4, "n_heads": 4, "max_len": 200},
    "large": {"d_model": 1024, "n_layers": 8, "n_heads": 16, "max_len": 200},
}


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        if cfg.head_dim is None and cfg.d_model % cfg.n_heads:
            raise ValueError(f"d_model={cfg.d_model} must be divisible by n_heads={cfg.n_heads}")
        self.n_heads = cfg.n_heads
        self.attention_dim = cfg.attention_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * self.attention_dim)
        self.out = nn.Linear(self.attention_dim, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        head_dim = self.attention_dim // self.n_heads
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(batch, length, self.attention_dim))


class Block(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.hidden_ffn_dim),
            nn.GELU(),
            nn.Linear(cfg.hidden_ffn_dim, cfg.d_model),
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:  # dropout is the identity at inference; skipping the calls saves per-request overhead
            x = x + self.attn(self.norm1(x))
            return x + self.ffn(self.norm2(x))
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.ffn(self.norm2(x)))

    def forward_last(self, x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """This block's output at one position per row (`last`, (batch,) indices), inference only.

        The keys and values need every position, but the query, the output projection and the FFN
        only the one whose output is kept: (batch, length, d) -> (batch, d). The query is sliced out
        of the full qkv projection (one Linear call, whatever kind of Linear a variant holds).
        """
        batch, length, _ = x.shape
        attn = self.attn
        head_dim = attn.attention_dim // attn.n_heads
        rows = torch.arange(batch, device=x.device)
        qkv = attn.qkv(self.norm1(x)).view(batch, length, 3, attn.n_heads, head_dim)
        q = qkv[rows, last, 0].unsqueeze(2)  # (batch, heads, 1, head_dim)
        k, v = qkv[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
        # Causal for the last real position = every key up to it; the padding after it is masked.
        visible = (torch.arange(length, device=x.device) <= last.view(-1, 1)).view(batch, 1, 1, length)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        x_last = x[rows, last] + attn.out(y.reshape(batch, attn.attention_dim))
        return x_last + self.ffn(self.norm2(x_last))


class SASRec(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.cfg = cfg
        self.item_embedding = nn.Embedding(cfg.n_items + 1, cfg.d_model, padding_idx=PADDING_INDEX)
        self.position_embedding = nn.Embedding(cfg.max_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model)
        # Set by `load_variant` when the directory holds an ONNX encoder (pipeline/models/onnx_encoder.py):
        # a callable (embedded, lengths) -> user vectors that `last_hidden` uses on CPU in place of encode_last,
        # for batches of up to `encoder_max_batch` users (None: every batch; `compress.runtime: auto` sets it).
        self.encoder: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        self.encoder_max_batch: int | None = None
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()

    def embed(self, items: torch.Tensor) -> torch.Tensor:
        """(batch, length) item indices -> their input vectors; variants swap only this lookup."""
        return self.item_embedding(items)

    def hidden(self, items: torch.Tensor) -> torch.Tensor:
        """(batch, length) right-padded item indices -> (batch, length, d_model)."""
        return self.encode(self.embed(items))

    def encode(self, embedded: torch.Tensor) -> torch.Tensor:
        """`hidden` from the input vectors (batch, length, d): for a caller that looks the items up
        itself (the sharded item table of pipeline/training/sharded.py)."""
        return self.final_norm(self._run_blocks(self._positioned(embedded), self.blocks))

    def _positioned(self, embedded: torch.Tensor) -> torch.Tensor:
        length = embedded.shape[1]
        if length > self.cfg.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len={self.cfg.max_len}")
        # Scaling the item embedding by sqrt(d) as in SASRec keeps it on the scale of the positions.
        # Positions are a slice of the table, not a lookup: one op fewer per request at serving time.
        x = embedded * math.sqrt(self.cfg.d_model) + self.position_embedding.weight[:length]
        return self.drop(x) if self.training else x

    @staticmethod
    def _run_blocks(x: torch.Tensor, blocks) -> torch.Tensor:
        for block in blocks:
            x = block(x)
        return x

    def encode_last(self, embedded: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Input vectors (batch, length, d) and lengths -> the user vectors (batch, d), inference only.

        The same values as `hidden` at each row's last real position, but the last block computes
        its query and FFN at that position only (see Block.forward_last); this is also the graph
        the ONNX encoder holds (pipeline/models/onnx_encoder.py).
        """
        x = self._run_blocks(self._positioned(embedded), self.blocks[:-1])
        return self.final_norm(self.blocks[-1].forward_last(x, (lengths - 1).clamp(min=0)))

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        return self.hidden(items)

    def item_weights(self) -> torch.Tensor:
        """Output item table (shared with the input); compressed variants override this."""
        return self.item_embedding.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.item_weights().T

    def runtime_for(self, batch: int, device: torch.device | str = "cpu") -> str:
        """What computes the user vectors of a batch of `batch` users at inference: "onnx" (the encoder,
        CPU only) or "torch" (`encode_last`). ONNX Runtime has less per-op overhead, PyTorch's fused
        attention wins on large batches, so `encoder_max_batch` can send large batches to PyTorch."""
        if self.encoder is None or torch.device(device).type != "cpu":
            return "torch"
        return "onnx" if self.encoder_max_batch is None or batch <= self.encoder_max_batch else "torch"

    def last_hidden(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Hidden state at each sequence's last real position: the user representation."""
        if not self.training:
            embedded = self.embed(items)
            if self.runtime_for(embedded.shape[0], embedded.device) == "onnx":
                return self.encoder(embedded, lengths)
            return self.encode_last(embedded, lengths)
        hidden = self.hidden(items)
        index = (lengths - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
        return hidden.gather(1, index).squeeze(1)

    def score(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Scores of every catalogue entry (padding included, column 0) for the next item."""
        return self.logits(self.last_hidden(items, lengths))

    def top_k(self, user_vectors: torch.Tensor, k: int, exclude: ExcludeArg = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The k best items per user vector (indices, scores), best first, padding and `exclude` never
        returned: the top-k of `logits` without the full score matrix. Variants with another table
        representation override it with their own scorer (pipeline/models/scoring.py)."""
        return dense_top_k(user_vectors, self.item_weights(), k, exclude)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_sasrec(n_items: int, preset: str, **overrides) -> SASRec:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return SASRec(SASRecConfig(n_items=n_items, **{**PRESETS[preset], **overrides}))


WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model_config.json"


def save_model(model: SASRec, directory: Path) -> None:
    """Weights as safetensors (no pickle) plus the config to rebuild the module; both atomic."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp))
    write_json(model.cfg.to_dict(), directory / CONFIG_FILE)


def load_model(directory: Path, device: torch.device | str = "cpu") -> SASRec:
    cfg = SASRecConfig(**json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8")))
    model = SASRec(cfg)
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE), device=str(device)))
    return model.to(device).eval()
