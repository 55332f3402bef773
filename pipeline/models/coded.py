"""CodedSASRec: SASRec whose item table is product-quantized item codes (pipeline/models/codes.py).

The input lookup and the output scoring both go through the codes: an item's input vector is the
concatenation of its sub-item centroids, and its score is the sum of its sub-space lookup-table
entries, so the (n_items + 1, d) table is never materialised. The codes are fixed (a uint8 buffer);
the codebooks are trainable, so the compress stage fine-tunes them with the Transformer.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.codes import PADDING_CODE, ItemCodes, assign_codes
from pipeline.models.sasrec import SASRec, SASRecConfig
from pipeline.models.scoring import ExcludeArg, PQPostings, dense_top_k, kernels_for, pq_postings, pq_top_k

CODES_PREFIX = "pq"  # state_dict keys pq.codes (uint8) and pq.codebooks
# From this many rows up the inverted lists of the codes are built (once, 4 bytes per row and sub-space)
# for the pruned exact search; below it a plain scan of the codes is as fast (docs/benchmarks.md).
POSTINGS_MIN_ROWS = 100_000
# Up to this many rows, inference scores the reconstructed table (built once per codebooks version,
# n_rows x d fp32: 2.5 MiB at 10k x 64) with the dense scorer instead of scanning the codes: one user
# over 10k rows took 0.19 ms dense against 0.24 ms for PQ m=8 (more sub-spaces cost more), over 100k
# rows 2.43 ms against 0.97 ms (docs/benchmarks.md, serving at scale, quiet rerun).
DENSE_SCAN_MAX_ROWS = 10_000


class CodedTable(nn.Module):
    """The trainable half of ItemCodes: codes as a buffer, codebooks as a parameter."""

    def __init__(self, n_rows: int, dim: int, n_subspaces: int, codebook_size: int):
        super().__init__()
        if dim % n_subspaces:
            raise ValueError(f"d_model={dim} must be divisible by n_subspaces={n_subspaces}")
        self.register_buffer("codes", torch.zeros(n_rows, n_subspaces, dtype=torch.uint8))
        self.codebooks = nn.Parameter(torch.zeros(n_subspaces, codebook_size, dim // n_subspaces))
        # The padding code's centroid is multiplied by 0 on every use: no gradient reaches it, so the
        # padding row stays exactly zero through fine-tuning whatever the optimizer does.
        keep = torch.ones(1, codebook_size, 1)
        keep[:, PADDING_CODE] = 0.0
        self.register_buffer("keep", keep, persistent=False)

    def item_codes(self) -> ItemCodes:
        """The live codes (codebooks attached to autograd: scores and lookups through it train them)."""
        return ItemCodes(self.codes, self.codebooks * self.keep)


class CodedSASRec(SASRec):
    def __init__(self, cfg: SASRecConfig, n_subspaces: int, codebook_size: int):
        super().__init__(cfg)
        del self.item_embedding  # replaced by the codes below
        setattr(self, CODES_PREFIX, CodedTable(cfg.n_items + 1, cfg.d_model, n_subspaces, codebook_size))

    @property
    def table(self) -> CodedTable:
        return getattr(self, CODES_PREFIX)

    @property
    def n_subspaces(self) -> int:
        return self.table.codebooks.shape[0]

    @property
    def codebook_size(self) -> int:
        return self.table.codebooks.shape[1]

    def item_codes(self) -> ItemCodes:
        return self.table.item_codes()

    def embed(self, items: torch.Tensor) -> torch.Tensor:
        if self._serves_dense():  # one lookup instead of the codes' few small ops per request
            return torch.nn.functional.embedding(items, self._reconstructed())
        return self.item_codes().reconstruct(items)

    def _small(self) -> bool:
        """A catalogue small enough for the dense scan of the cached reconstruction (see DENSE_SCAN_MAX_ROWS)."""
        return self.table.codes.shape[0] <= DENSE_SCAN_MAX_ROWS

    def _serves_dense(self) -> bool:
        """Inference on a small catalogue: the cached reconstruction stands in for the codes."""
        return self._small() and not self.training and not torch.is_grad_enabled()

    def item_weights(self) -> torch.Tensor:
        """The reconstructed table (for callers that need it dense; scoring does not)."""
        return self.item_codes().reconstruct()

    def top_k(self, user_vectors: torch.Tensor, k: int, exclude: ExcludeArg = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k from the codes: per-user lookup tables, then the PQ scan (pipeline/models/scoring.py);
        on a small catalogue the dense scan of the reconstructed table, which is faster there."""
        if self._small():
            return dense_top_k(user_vectors.float(), self._reconstructed(), k, exclude)  # no autograd: top_k never trains
        codes = self.item_codes()
        with torch.no_grad():
            lut = codes.lookup_tables(user_vectors.float())
        return pq_top_k(lut, codes.codes, k, exclude, postings=self._postings())

    def _reconstructed(self) -> torch.Tensor:
        """The dense table the codes stand for, rebuilt when the codebooks change (fine-tuning steps them in place)."""
        version = (self.table.codebooks.data_ptr(), self.table.codebooks._version)
        cached = getattr(self, "_cached_table", None)
        if cached is None or cached[0] != version:
            with torch.no_grad():
                cached = (version, self.item_codes().reconstruct().float().contiguous())
            self._cached_table = cached
        return cached[1]

    def _postings(self) -> PQPostings | None:
        """Inverted lists of the (fixed) codes for the pruned search, built on first use on a large CPU table."""
        codes = self.table.codes
        if codes.shape[0] < POSTINGS_MIN_ROWS or kernels_for(codes) is None:
            return None
        if getattr(self, "_cached_postings", None) is None:
            self._cached_postings = pq_postings(codes, self.codebook_size)
        return self._cached_postings

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores through the sub-space lookup tables, any leading shape: (..., d) -> (..., n_items + 1)."""
        scores = self.item_codes().scores(hidden.reshape(-1, hidden.shape[-1]))
        return scores.reshape(*hidden.shape[:-1], scores.shape[-1])


def code_teacher(teacher: SASRec, n_subspaces: int, codebook_size: int, seed: int) -> CodedSASRec:
    """The teacher with its item table replaced by codes assigned by k-means; every other weight copied."""
    codes = assign_codes(teacher.item_weights().detach().cpu(), n_subspaces, codebook_size, seed)
    model = CodedSASRec(teacher.cfg, n_subspaces, codebook_size)
    others = {k: v for k, v in teacher.state_dict().items() if k != "item_embedding.weight"}
    model.load_state_dict({**others, **codes.state_dict(CODES_PREFIX)})
    return model
