"""numba kernels behind pipeline/models/scoring.py: item scores with the top-K selected as they are computed.

Each kernel scans one block of rows and keeps, per user, a min-heap of the k best (score, row)
pairs seen so far; a row is pushed only when it beats the heap's minimum, so after the first few
thousand rows almost every score costs one comparison and the (B, n_rows) score matrix is never
written. `run_blocks` runs the blocks on a pool of Python threads, each block with its own heaps
(merged at the end). The kernels are serial and release the GIL: numba's own parallel layer
(OpenMP) would keep a second spinning thread pool beside torch's, and measured on 2 cores that
slowed the Transformer that runs next from 0.2 ms to 60 ms; a Python pool sleeps when idle and
is safe to call from several serving threads at once.

Exclusion is exact: row 0 (padding) is never scored, and a row that would enter a user's heap is
first looked up (binary search) in that user's sorted excluded rows, so an excluded row never
appears however high it scores. Slots left when fewer than k rows are eligible hold row 0 with
score -inf.

Layouts (numpy, C-contiguous): codes uint8 (n_rows, d) or (n_rows, m); hidden float32 (B, d);
lookup tables float32 (B, m, K), or (m, K, B) for the batched PQ scan; heaps (B, blocks, k);
excluded rows as CSR, `excluded_start` int64 (B + 1) into `excluded` int64 (each slice sorted).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit

# fastmath lets LLVM reorder the float sums into SIMD lanes (the dot products vectorise); results
# differ from a sequential sum by float rounding only. nogil: blocks run on threads in parallel.
KERNEL = {"cache": True, "nogil": True, "fastmath": True}
MIN_ROWS_PER_THREAD = 20_000  # below this a block costs less than handing it to a thread


@functools.cache
def _pool(n_threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="leanrec-topk")


def run_blocks(kernel: Callable, n_blocks: int, n_threads: int, *args) -> None:
    """kernel(*args, block, n_blocks) for every block, on n_threads threads (inline for one)."""
    if n_threads <= 1 or n_blocks == 1:
        for block in range(n_blocks):
            kernel(*args, block, n_blocks)
        return
    futures = [_pool(n_threads).submit(kernel, *args, block, n_blocks) for block in range(n_blocks)]
    for future in futures:
        future.result()


def blocks_for(n_rows: int, n_threads: int) -> int:
    """Blocks of rows to scan: two per thread (a thread slowed by other work does not hold up the
    rest), fewer when there are too few rows to be worth a thread."""
    return max(1, min(2 * n_threads, n_rows // MIN_ROWS_PER_THREAD))


def new_heaps(n_users: int, n_blocks: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Empty heaps (-inf, row 0) for each user and block: (B, blocks, k)."""
    return np.full((n_users, n_blocks, k), -np.inf, np.float32), np.zeros((n_users, n_blocks, k), np.int64)


@njit(**KERNEL)
def _is_excluded(excluded: np.ndarray, lo: int, hi: int, row: int) -> bool:
    end = hi
    while lo < hi:
        mid = (lo + hi) >> 1
        if excluded[mid] < row:
            lo = mid + 1
        else:
            hi = mid
    return lo < end and excluded[lo] == row


@njit(**KERNEL)
def _push(values: np.ndarray, rows: np.ndarray, value: float, row: int) -> None:
    """Replace the min-heap's root (values[0], the k-th best so far) by (value, row) and restore the heap."""
    size = values.shape[0]
    pos = 0
    while True:
        child = 2 * pos + 1
        if child >= size:
            break
        if child + 1 < size and values[child + 1] < values[child]:
            child += 1
        if values[child] >= value:
            break
        values[pos] = values[child]
        rows[pos] = rows[child]
        pos = child
    values[pos] = value
    rows[pos] = row


@njit(**KERNEL)
def _offer(values, rows, value, row, excluded, excluded_start, user) -> float:
    """Push (value, row) unless the row is excluded for `user`; returns the heap's new minimum."""
    if not _is_excluded(excluded, excluded_start[user], excluded_start[user + 1], row):
        _push(values, rows, value, row)
    return values[0]


@njit(**KERNEL)
def _bounds(n_rows: int, block: int, n_blocks: int) -> tuple[int, int]:
    """Rows [start, stop) of one block of rows 1..n_rows-1 (row 0 is padding)."""
    step = (n_rows - 1 + n_blocks - 1) // n_blocks
    start = 1 + block * step
    return start, min(n_rows, start + step)


@njit(**KERNEL)
def merge_heaps(values, rows, top_values, top_rows, block, n_blocks) -> None:
    """(B, blocks, k) heaps -> (B, k) best first, for this block's share of the users."""
    n_users, n_heaps, k = values.shape
    step = (n_users + n_blocks - 1) // n_blocks
    for user in range(block * step, min(n_users, (block + 1) * step)):
        candidates = values[user].reshape(n_heaps * k)
        candidate_rows = rows[user].reshape(n_heaps * k)
        order = np.argsort(-candidates)[:k]
        top_values[user] = candidates[order]
        top_rows[user] = candidate_rows[order]


@njit(**KERNEL)
def select_top_k(scores, first_row, values, rows, excluded, excluded_start, block, n_blocks) -> None:
    """Offer this block's columns of a score chunk (B, C) of rows first_row.. to the running heaps."""
    n_users, width = scores.shape
    step = (width + n_blocks - 1) // n_blocks
    for user in range(n_users):
        heap_values, heap_rows = values[user, block], rows[user, block]
        threshold = heap_values[0]
        for column in range(block * step, min(width, (block + 1) * step)):
            score = scores[user, column]
            if score > threshold and first_row + column != 0:
                threshold = _offer(heap_values, heap_rows, score, first_row + column, excluded, excluded_start, user)


@njit(**KERNEL)
def rowwise_int8_top_k(codes, scale, offset, hidden, values, rows, excluded, excluded_start, block, n_blocks) -> None:
    """score = scale_i * (h . codes_i) + offset_i * sum(h): the dequantized table's score, table never dequantized."""
    n_users = hidden.shape[0]
    n_rows, dim = codes.shape
    hidden_sum = np.zeros(n_users, np.float32)
    thresholds = np.empty(n_users, np.float32)
    for user in range(n_users):
        thresholds[user] = values[user, block, 0]
        for j in range(dim):
            hidden_sum[user] += hidden[user, j]
    row_values = np.empty(dim, np.float32)
    start, stop = _bounds(n_rows, block, n_blocks)
    for row in range(start, stop):
        row_codes = codes[row]
        for j in range(dim):  # uint8 -> float once per row, shared by every user
            row_values[j] = row_codes[j]
        for user in range(n_users):
            user_vector = hidden[user]
            dot = np.float32(0.0)
            for j in range(dim):
                dot += user_vector[j] * row_values[j]
            score = scale[row] * dot + offset[row] * hidden_sum[user]
            if score > thresholds[user]:
                thresholds[user] = _offer(values[user, block], rows[user, block], score, row, excluded, excluded_start, user)


@njit(**KERNEL)
def pq_top_k_per_user(codes, lut, values, rows, excluded, excluded_start, block, n_blocks) -> None:
    """score_i = sum_j lut[b, j, codes[i, j]], one user at a time (its (m, K) table stays in L1)."""
    n_users = lut.shape[0]
    n_rows, n_sub = codes.shape
    start, stop = _bounds(n_rows, block, n_blocks)
    for user in range(n_users):
        table = lut[user]
        heap_values, heap_rows = values[user, block], rows[user, block]
        threshold = heap_values[0]
        for row in range(start, stop):
            score = np.float32(0.0)
            for j in range(n_sub):
                score += table[j, codes[row, j]]
            if score > threshold:
                threshold = _offer(heap_values, heap_rows, score, row, excluded, excluded_start, user)


@njit(**KERNEL)
def pq_top_k_batched(codes, lut_by_code, values, rows, excluded, excluded_start, block, n_blocks) -> None:
    """The same sums for many users: lut_by_code (m, K, B), so each row adds m contiguous B-vectors
    (the loop over users vectorises) and one vectorised max tells whether any user's heap takes it."""
    n_users = lut_by_code.shape[2]
    n_rows, n_sub = codes.shape
    scores = np.empty(n_users, np.float32)
    thresholds = np.empty(n_users, np.float32)
    for user in range(n_users):
        thresholds[user] = values[user, block, 0]
    start, stop = _bounds(n_rows, block, n_blocks)
    for row in range(start, stop):
        first = lut_by_code[0, codes[row, 0]]
        for user in range(n_users):
            scores[user] = first[user]
        for j in range(1, n_sub):
            part = lut_by_code[j, codes[row, j]]
            for user in range(n_users):
                scores[user] += part[user]
        best_margin = np.float32(-np.inf)
        for user in range(n_users):
            best_margin = max(best_margin, scores[user] - thresholds[user])
        if best_margin > 0:
            for user in range(n_users):
                if scores[user] > thresholds[user]:
                    thresholds[user] = _offer(values[user, block], rows[user, block], scores[user], row,
                                              excluded, excluded_start, user)
