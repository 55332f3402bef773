"""Exact top-K over a whole catalogue, one scorer per item-table representation.

Every scorer takes user vectors (B, d) float32 (lookup tables for product-quantized codes), the
table, k and the rows to exclude, and returns (indices (B, k) int64, scores (B, k) float32) best
first: the top-K of the dense scores on the same weights (equal up to float rounding, so only near
ties may swap). Row 0 (padding) is never returned, excluded rows never are (however high they
score), and when fewer than k rows are eligible the remaining slots hold row 0 with score -inf.

- `dense_top_k`: an fp32 table; GEMM over row chunks with a running top-k, so batch 256 over a
  million rows never holds a (256, 1M) score matrix.
- `rowwise_int8_top_k`: a row-wise int8 table (pipeline/models/quantize.py) scored without
  dequantizing it: score_i = scale_i * (h . codes_i) + offset_i * sum(h), the user vector kept in
  fp32 (exact; docs/benchmarks.md has why not `torch._int_mm` on a quantized user vector).
- `pq_top_k`: product-quantized codes; score_i = sum_j lut[b, j, codes[i, j]].

On CPU with numba installed the scans run in pipeline/models/topk_kernels.py (the top-K selected
while scoring, on as many threads as torch uses); elsewhere (CUDA tensors, no numba) the same
chunked loops run in torch, which is also the tests' reference.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch

from pipeline.models.quantize import RowwiseQuantized

PADDING_ROW = 0
# One chunk's (B, C) scores: bounded whatever the batch and catalogue, and small enough to stay in cache
# (256 users over 1M rows, 2 threads: 1.13 s with 4 MiB chunks, 2.12 s with 64 MiB).
SCORE_BUDGET_BYTES = 4 * 2**20
MIN_CHUNK_ROWS = 4096
# Up to this many scores (B x rows) one masked torch.topk beats the kernels' per-call overhead
# (a 150-item catalogue, one user: ~10 us against ~100 us).
SMALL_SCORES = 65_536
# Up to this many users each user's PQ lookup table is summed on its own (it stays in L1); above
# it the users go in the inner loop (lookup tables transposed to (m, K, users)), this many at a time.
# Both measured at 1M rows, m = 8, 2 threads (docs/benchmarks.md): per user is faster at 1-2 users,
# batched from 4 (25 ms against 38 ms); tiles of 32 users beat 64 (659 against 721 ms at 256 users).
PQ_PER_USER_MAX_USERS = 2
PQ_USER_TILE = 32
# Up to this many users the int8 codes are scanned once with every user's dot product fused in;
# above it, blocks of rows are dequantized and go through GEMM. Measured at 1M rows, 2 threads:
# fused 121 ms against 191 ms at 16 users, 456 against 382 ms at 64, 1.88 s against 1.05 s at 256.
INT8_FUSED_MAX_USERS = 32
# The pruned PQ search (with postings) for up to this many users, and the share of a block it may
# score before it scans the rest instead (bounds the worst case, a table where pruning fails).
# Measured on the 1M-item benchmark table, 2 threads, m = 8: 3.6 against 5.1 ms for one user,
# 7.9 against 9.7 ms for two, even at four (19.9 / 20.5 ms), slower from eight (28 / 21 ms).
PQ_PRUNED_MAX_USERS = 2
PQ_PRUNED_MAX_SCORED_SHARE = 0.3
# Rows dequantized at a time on the GEMM path: cache-sized (4096 rows: 382 ms at 64 users, 16384: 535 ms).
INT8_DEQUANTIZE_ROWS = 4096


@dataclass(frozen=True)
class Exclusion:
    """Rows excluded per user, as CSR: user b's rows are rows[start[b]:start[b + 1]], sorted, unique."""

    start: np.ndarray  # int64 (B + 1,)
    rows: np.ndarray  # int64

    @property
    def n_users(self) -> int:
        return len(self.start) - 1

    @classmethod
    def none(cls, n_users: int) -> Exclusion:
        return cls(np.zeros(n_users + 1, np.int64), np.zeros(0, np.int64))

    @classmethod
    def from_lists(cls, rows_per_user: Sequence[Sequence[int]]) -> Exclusion:
        unique = [np.unique(np.asarray(rows, dtype=np.int64)) for rows in rows_per_user]
        start = np.zeros(len(unique) + 1, np.int64)
        np.cumsum([len(rows) for rows in unique], out=start[1:])
        return cls(start, np.concatenate(unique) if unique else np.zeros(0, np.int64))

    def pairs(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(user, row) index tensors of every excluded entry."""
        users = np.repeat(np.arange(self.n_users, dtype=np.int64), np.diff(self.start))
        return torch.from_numpy(users).to(device), torch.from_numpy(self.rows).to(device)


ExcludeArg = Exclusion | Sequence[Sequence[int]] | None


def as_exclusion(exclude: ExcludeArg, n_users: int) -> Exclusion:
    exclusion = Exclusion.none(n_users) if exclude is None else (
        exclude if isinstance(exclude, Exclusion) else Exclusion.from_lists(exclude))
    if exclusion.n_users != n_users:
        raise ValueError(f"exclusions for {exclusion.n_users} users, but {n_users} user vectors")
    return exclusion


@functools.cache
def _numba_kernels() -> ModuleType | None:
    """pipeline.models.topk_kernels, or None where numba is not installed (the torch loops run instead)."""
    try:
        from pipeline.models import topk_kernels
    except ImportError:  # numba is not installed
        return None
    return topk_kernels


def kernels_for(tensor: torch.Tensor) -> ModuleType | None:
    """The numba kernels when they can run on `tensor` (a CPU tensor, numba installed)."""
    return _numba_kernels() if tensor.device.type == "cpu" else None


def _threads() -> int:
    """The kernels use as many threads as torch: the thread budget set for serving holds for both."""
    return max(1, torch.get_num_threads())


def _check_k(k: int, n_rows: int) -> None:
    if not 1 <= k <= n_rows - 1:
        raise ValueError(f"k must be between 1 and {n_rows - 1} (the rows after padding), got {k}")


def chunk_rows(n_users: int, n_rows: int) -> int:
    """Rows per chunk so that one chunk's scores fit SCORE_BUDGET_BYTES."""
    return min(n_rows, max(MIN_CHUNK_ROWS, SCORE_BUDGET_BYTES // (4 * max(1, n_users))))


def _finish(values: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots with no eligible row (score -inf) point at padding, whatever the selection put there."""
    rows = rows.masked_fill(values == float("-inf"), PADDING_ROW)
    return rows, values


def _merged_top_k(kernels: ModuleType, values: np.ndarray, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks' heaps merged into (B, k) best first (users split across threads when many)."""
    n_users, n_blocks, k = values.shape
    top_values, top_rows = np.empty((n_users, k), np.float32), np.empty((n_users, k), np.int64)
    merge_blocks = min(n_users, _threads()) if n_users * n_blocks * k > 100_000 else 1
    kernels.run_blocks(kernels.merge_heaps, merge_blocks, _threads(), values, rows, top_values, top_rows)
    return _finish(torch.from_numpy(top_values), torch.from_numpy(top_rows))


def _scan(kernels: ModuleType, kernel: Callable, n_users: int, n_rows: int, k: int, exclusion: Exclusion,
          *arrays: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused scan-and-select kernel over all rows, in blocks on torch's thread count."""
    _check_k(k, n_rows)
    n_blocks = kernels.blocks_for(n_rows * n_users, _threads())
    values, rows = kernels.new_heaps(n_users, n_blocks, k)
    kernels.run_blocks(kernel, n_blocks, _threads(), *arrays, values, rows, exclusion.rows, exclusion.start)
    return _merged_top_k(kernels, values, rows)


def masked_scores(scores: torch.Tensor, exclusion: Exclusion) -> torch.Tensor:
    """A float copy of `scores` (B, n_rows) with padding and every excluded row at -inf, in one fill."""
    scores = scores.float().clone()
    width = scores.shape[1]
    users = np.repeat(np.arange(exclusion.n_users, dtype=np.int64), np.diff(exclusion.start))
    inside = (exclusion.rows >= 0) & (exclusion.rows < width)  # rows outside the table exclude nothing, as in the kernels
    masked = np.concatenate([np.arange(exclusion.n_users, dtype=np.int64) * width + PADDING_ROW,
                             users[inside] * width + exclusion.rows[inside]])
    scores.view(-1).index_fill_(0, torch.from_numpy(masked).to(scores.device), float("-inf"))
    return scores


def _one_chunk_top_k(scores: torch.Tensor, k: int, exclusion: Exclusion) -> tuple[torch.Tensor, torch.Tensor]:
    """Small catalogues: one masked fill over all scores and torch.topk (fewer calls than the kernels)."""
    top = torch.topk(masked_scores(scores, exclusion), k, dim=1)
    return _finish(top.values, top.indices)


def chunked_top_k(score_chunk: Callable[[int, int], torch.Tensor], n_users: int, n_rows: int, k: int,
                  exclusion: Exclusion, device: torch.device, rows_per_chunk: int | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over rows scored chunk by chunk: `score_chunk(start, stop)` -> (B, stop - start) scores."""
    _check_k(k, n_rows)
    step = rows_per_chunk or chunk_rows(n_users, n_rows)
    kernels = kernels_for(torch.empty(0, device=device))
    if step >= n_rows and n_users * n_rows <= SMALL_SCORES:
        return _one_chunk_top_k(score_chunk(0, n_rows), k, exclusion)
    if kernels is not None:
        n_blocks = kernels.blocks_for(min(step, n_rows) * n_users, _threads())
        values, rows = kernels.new_heaps(n_users, n_blocks, k)
        for start in range(0, n_rows, step):
            scores = score_chunk(start, min(n_rows, start + step)).float().contiguous().numpy()
            kernels.run_blocks(kernels.select_top_k, n_blocks, _threads(), scores, start, values, rows,
                               exclusion.rows, exclusion.start)
        return _merged_top_k(kernels, values, rows)
    users, excluded = exclusion.pairs(device)
    best_values = torch.full((n_users, k), float("-inf"), device=device)
    best_rows = torch.zeros((n_users, k), dtype=torch.long, device=device)
    for start in range(0, n_rows, step):
        stop = min(n_rows, start + step)
        scores = score_chunk(start, stop).float().clone()
        if start == PADDING_ROW:
            scores[:, PADDING_ROW] = float("-inf")
        inside = (excluded >= start) & (excluded < stop)
        scores[users[inside], excluded[inside] - start] = float("-inf")
        top = torch.topk(scores, min(k, stop - start), dim=1)
        merged_values = torch.cat([best_values, top.values], dim=1)
        merged_rows = torch.cat([best_rows, top.indices + start], dim=1)
        keep = torch.topk(merged_values, k, dim=1)
        best_values, best_rows = keep.values, merged_rows.gather(1, keep.indices)
    return _finish(best_values, best_rows)


def target_rank_counts(scores: torch.Tensor, targets: torch.Tensor, exclusion: Exclusion) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows scoring above each user's target row, rows tying it), over rows that are not padding,
    not the target and not excluded: the exact full-ranking position without a masked copy of `scores`."""
    n_users, width = scores.shape
    targets = targets.view(-1).long()
    kernels = kernels_for(scores)
    if kernels is not None:
        scores_array = scores.detach().float().contiguous().numpy()
        greater, ties = np.zeros(n_users, np.int64), np.zeros(n_users, np.int64)
        n_blocks = max(1, min(n_users, _threads()))
        kernels.run_blocks(kernels.target_rank_counts, n_blocks, _threads(), scores_array, targets.numpy(),
                           exclusion.rows, exclusion.start, greater, ties)
        return torch.from_numpy(greater), torch.from_numpy(ties)
    masked = masked_scores(scores.detach(), exclusion)
    target_scores = scores.detach().float().gather(1, targets.view(-1, 1))
    masked.scatter_(1, targets.view(-1, 1), float("-inf"))  # the target is not its own competitor
    return (masked > target_scores).sum(1), (masked == target_scores).sum(1)


def dense_top_k(hidden: torch.Tensor, table: torch.Tensor, k: int, exclude: ExcludeArg = None,
                rows_per_chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k rows of `table` (n_rows, d) by hidden @ table.T."""
    hidden, table = hidden.detach().float(), table.detach().float()

    def score_chunk(start: int, stop: int) -> torch.Tensor:
        return hidden @ table[start:stop].T

    exclusion = as_exclusion(exclude, hidden.shape[0])
    return chunked_top_k(score_chunk, hidden.shape[0], table.shape[0], k, exclusion, hidden.device, rows_per_chunk)


def rowwise_int8_top_k(hidden: torch.Tensor, table: RowwiseQuantized, k: int, exclude: ExcludeArg = None,
                       rows_per_chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k rows of a row-wise int8 table: the dense top-k of table.dequantize(), without dequantizing it all."""
    if table.bits != 8:
        raise ValueError(f"rowwise_int8_top_k scores 8-bit tables, got {table.bits} bits")
    hidden = hidden.detach().float().contiguous()
    n_users, n_rows = hidden.shape[0], table.codes.shape[0]
    exclusion = as_exclusion(exclude, n_users)
    kernels = kernels_for(hidden)
    if kernels is not None and n_users <= INT8_FUSED_MAX_USERS:
        return _scan(kernels, kernels.rowwise_int8_top_k, n_users, n_rows, k, exclusion, table.codes.contiguous().numpy(),
                     table.scale.float().contiguous().numpy(), table.offset.float().contiguous().numpy(), hidden.numpy())

    def score_chunk(start: int, stop: int) -> torch.Tensor:
        return hidden @ table.dequantize(slice(start, stop)).T

    rows_per_chunk = rows_per_chunk or min(chunk_rows(n_users, n_rows), INT8_DEQUANTIZE_ROWS)
    return chunked_top_k(score_chunk, n_users, n_rows, k, exclusion, hidden.device, rows_per_chunk)


@dataclass(frozen=True)
class PQPostings:
    """Inverted lists of PQ codes (per block of rows: the rows holding each code of each sub-space),
    what `pq_top_k`'s pruned search reads; built once per code table by `pq_postings`."""

    offsets: np.ndarray  # int64 (blocks, m, K + 1)
    rows: np.ndarray  # int32 (blocks, m, rows per block)

    @property
    def nbytes(self) -> int:
        return self.offsets.nbytes + self.rows.nbytes


def pq_postings(codes: torch.Tensor, n_codes: int = 256, n_blocks: int | None = None) -> PQPostings:
    """Inverted lists for `pq_top_k(..., postings=)`: 4 bytes per row and sub-space (32 MB for 1M rows, m = 8),
    in one block per thread by default (each block is searched on its own thread)."""
    kernels = _numba_kernels()
    if kernels is None:
        raise RuntimeError("the pruned PQ search needs numba")
    codes_array = codes.contiguous().numpy()
    n_rows, n_sub = codes_array.shape
    n_blocks = n_blocks or max(1, min(_threads(), (n_rows - 1) // kernels.MIN_ROWS_PER_THREAD))
    per_block = -(-(n_rows - 1) // n_blocks)
    offsets = np.zeros((n_blocks, n_sub, n_codes + 1), np.int64)
    rows = np.zeros((n_blocks, n_sub, per_block), np.int32)
    kernels.run_blocks(kernels.build_postings, n_blocks, _threads(), codes_array, n_codes, offsets, rows)
    return PQPostings(offsets, rows)


def pq_scores(lut: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """(B, n_rows) scores sum_j lut[b, j, codes[i, j]]: the reference sum, in torch."""
    codes = codes.long()
    scores = lut[:, 0, codes[:, 0]]
    for j in range(1, codes.shape[1]):
        scores = scores + lut[:, j, codes[:, j]]
    return scores


def pq_top_k(lut: torch.Tensor, codes: torch.Tensor, k: int, exclude: ExcludeArg = None,
             rows_per_chunk: int | None = None, postings: PQPostings | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k rows of product-quantized codes (n_rows, m) uint8 by the lookup tables lut (B, m, K).

    With `postings` (and numba), up to PQ_PRUNED_MAX_USERS users are searched by the pruned
    threshold algorithm (topk_kernels.pq_pruned_top_k): the same top-k, most rows never scored."""
    if lut.dim() != 3 or codes.dim() != 2 or lut.shape[1] != codes.shape[1]:
        raise ValueError(f"lookup tables (B, m, K) and codes (n_rows, m) disagree: {tuple(lut.shape)}, {tuple(codes.shape)}")
    lut = lut.detach().float().contiguous()
    n_users, n_rows = lut.shape[0], codes.shape[0]
    exclusion = as_exclusion(exclude, n_users)
    kernels = kernels_for(lut)
    if kernels is None:
        def score_chunk(start: int, stop: int) -> torch.Tensor:
            return pq_scores(lut, codes[start:stop])

        return chunked_top_k(score_chunk, n_users, n_rows, k, exclusion, lut.device, rows_per_chunk)
    codes_array = codes.contiguous().numpy()
    if postings is not None and n_users <= PQ_PRUNED_MAX_USERS:
        _check_k(k, n_rows)
        n_blocks = postings.offsets.shape[0]
        values, rows = kernels.new_heaps(n_users, n_blocks, k)
        kernels.run_blocks(kernels.pq_pruned_top_k, n_blocks, _threads(), codes_array, lut.numpy(), postings.offsets,
                           postings.rows, PQ_PRUNED_MAX_SCORED_SHARE, values, rows, exclusion.rows, exclusion.start)
        return _merged_top_k(kernels, values, rows)
    if n_users <= PQ_PER_USER_MAX_USERS:
        return _scan(kernels, kernels.pq_top_k_per_user, n_users, n_rows, k, exclusion, codes_array, lut.numpy())
    tops = []
    for first in range(0, n_users, PQ_USER_TILE):
        last = min(n_users, first + PQ_USER_TILE)
        tile = Exclusion(exclusion.start[first : last + 1] - exclusion.start[first],
                         exclusion.rows[exclusion.start[first] : exclusion.start[last]])
        lut_by_code = lut[first:last].permute(1, 2, 0).contiguous().numpy()  # (m, K, users)
        tops.append(_scan(kernels, kernels.pq_top_k_batched, last - first, n_rows, k, tile, codes_array, lut_by_code))
    return torch.cat([top[0] for top in tops]), torch.cat([top[1] for top in tops])
