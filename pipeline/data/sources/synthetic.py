"""Seeded generator of implicit-feedback interaction logs that behave like real ones.

What makes it useful for a recommender benchmark rather than noise:
- item popularity follows a power law (Zipf with `popularity_exponent`);
- users have latent tastes: a sparse Dirichlet mixture over `n_topics`, items
  belong to one topic each, so matrix factorisation has structure to find;
- sequential structure: every item has a few "successor" items (the next
  episode, the accessory after the phone); with probability
  `sequential_strength` a user's next item is a successor of the last one, so
  a sequential model can beat popularity and matrix factorisation;
- `noise_rate` of interactions are random items rated 1-2 (mis-clicks), which an
  implicit-feedback threshold of 3 removes;
- sequence lengths are heavy-tailed (log-normal), timestamps increase per user
  with user-specific activity rates.

Users are generated in chunks (`chunk_users`) and yielded as Arrow tables, so
10M+ interactions never need to sit in memory at once. Each chunk has its own
seeded random stream, so output is a pure function of the config and the seed.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pyarrow as pa

from pipeline.core import schema
from pipeline.core.config import SyntheticConfig

logger = logging.getLogger(__name__)

SUCCESSORS_PER_ITEM = 3
REPEAT_REDRAWS = 3
# The per-chunk "seen" bitmap is users x items bytes; chunks shrink so it stays under this.
MAX_SEEN_BITMAP_BYTES = 256 * 1024 * 1024
# Ratings of intended interactions are 3-5, of noise 1-2: a threshold of 3 keeps exactly the signal.
SIGNAL_RATINGS = np.array([3.0, 4.0, 5.0], dtype=np.float32)
SIGNAL_RATING_PROBS = np.array([0.2, 0.4, 0.4])
NOISE_RATINGS = np.array([1.0, 2.0], dtype=np.float32)
MEAN_GAP_SECONDS = 4 * 3600
MIN_SEQUENCE_LENGTH = 3
TASTE_CONCENTRATION = 0.2  # Dirichlet alpha: small -> each user likes a few topics


@dataclass(frozen=True)
class Catalogue:
    """Items laid out in topic blocks; `item_ids` maps a block position to the public item id."""

    item_ids: np.ndarray  # int64[n_items]
    topic_start: np.ndarray  # int64[n_topics]: first block position of each topic
    topic_end: np.ndarray  # int64[n_topics]: one past the last
    popularity_cumsum: np.ndarray  # float64[n_items], cumulative popularity over block positions
    successors: np.ndarray  # int64[n_items, SUCCESSORS_PER_ITEM], block positions

    @cached_property
    def _topic_bounds(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per topic: cumulative popularity before it, its width, its last block position."""
        cum = self.popularity_cumsum
        low = np.where(self.topic_start > 0, cum[self.topic_start - 1], 0.0)
        return low, cum[self.topic_end - 1] - low, self.topic_end - 1

    def sample_in_topics(self, rng: np.random.Generator, topics: np.ndarray) -> np.ndarray:
        """Popularity-weighted item (block position) inside each given topic, vectorised."""
        low, width, last = self._topic_bounds
        draws = low[topics] + rng.random(len(topics)) * width[topics]
        positions = np.searchsorted(self.popularity_cumsum, draws, side="right")
        return np.clip(positions, self.topic_start[topics], last[topics])


def build_catalogue(cfg: SyntheticConfig, rng: np.random.Generator) -> Catalogue:
    n_items, n_topics = cfg.n_items, min(cfg.n_topics, cfg.n_items)
    # Topic sizes vary (some genres are bigger); every topic gets at least one item.
    sizes = 1 + rng.multinomial(n_items - n_topics, rng.dirichlet(np.full(n_topics, 2.0)))
    topic_end = np.cumsum(sizes)
    topic_start = topic_end - sizes
    topic_of_position = np.repeat(np.arange(n_topics), sizes)

    # Zipf popularity over a random ranking, so popularity is independent of topic.
    ranks = rng.permutation(n_items) + 1
    popularity = ranks.astype(np.float64) ** -cfg.popularity_exponent
    popularity_cumsum = np.cumsum(popularity)

    catalogue = Catalogue(
        item_ids=rng.permutation(n_items).astype(np.int64) + 1,
        topic_start=topic_start.astype(np.int64),
        topic_end=topic_end.astype(np.int64),
        popularity_cumsum=popularity_cumsum,
        successors=np.empty((n_items, SUCCESSORS_PER_ITEM), dtype=np.int64),
    )
    # Successors: uniform among items of the same topic (a series continues in its genre, and
    # follow-ups reach the long tail, which popularity alone never recommends).
    start, size = topic_start[topic_of_position], sizes[topic_of_position]
    for k in range(SUCCESSORS_PER_ITEM):
        catalogue.successors[:, k] = start + rng.integers(0, size)
    return catalogue


def n_users_for(cfg: SyntheticConfig) -> int:
    n_users = max(1, int(round(cfg.n_interactions / cfg.mean_sequence_length)))
    return min(n_users, cfg.n_interactions // MIN_SEQUENCE_LENGTH)


def users_per_chunk(cfg: SyntheticConfig) -> int:
    return max(1, min(cfg.chunk_users, MAX_SEEN_BITMAP_BYTES // cfg.n_items))


def n_chunks_for(cfg: SyntheticConfig) -> int:
    return -(-n_users_for(cfg) // users_per_chunk(cfg))


def sequence_lengths(cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """Heavy-tailed per-user lengths, at least MIN_SEQUENCE_LENGTH, summing exactly to n_interactions."""
    n_total = cfg.n_interactions
    n_users = n_users_for(cfg)
    extra_total = n_total - MIN_SEQUENCE_LENGTH * n_users
    raw = rng.lognormal(mean=0.0, sigma=1.0, size=n_users)
    cap = 20 * max(cfg.mean_sequence_length, 1.0)
    extra = np.minimum(np.floor(raw / raw.sum() * extra_total), cap).astype(np.int64)
    # Hand out the rounding remainder one interaction at a time to random users.
    remainder = extra_total - int(extra.sum())
    while remainder > 0:
        chosen = rng.choice(n_users, size=min(remainder, n_users), replace=False)
        extra[chosen] += 1
        remainder -= len(chosen)
    return extra + MIN_SEQUENCE_LENGTH


def _sample_tastes(rng: np.random.Generator, catalogue: Catalogue, taste_cumsum_t: np.ndarray) -> np.ndarray:
    """One item per user: a topic from the user's taste mixture, then an item by popularity.

    `taste_cumsum_t` is topics x users (each column a user's cumulative mixture): the count of
    entries below the draw sums rows, which numpy vectorises, where a users x topics sum did not.
    """
    n_topics = taste_cumsum_t.shape[0]
    topics = np.minimum((taste_cumsum_t < rng.random(taste_cumsum_t.shape[1])).sum(axis=0), n_topics - 1)
    return catalogue.sample_in_topics(rng, topics)


class _Scratch:
    """Buffers reused from chunk to chunk: a fresh 256 MiB "seen" bitmap per chunk cost more in page
    faults than the draws themselves (docs/benchmarks.md, "Side by side with milestone 1's path")."""

    def __init__(self, n_users: int, n_items: int) -> None:
        self.seen = np.zeros((n_users, n_items), dtype=bool)  # all False between chunks
        self.exponentials = np.empty(0)

    def exponential_block(self, shape: tuple[int, int]) -> np.ndarray:
        size = shape[0] * shape[1]
        if self.exponentials.size < size:
            self.exponentials = np.empty(size)
        return self.exponentials[:size].reshape(shape)


def _generate_chunk(
    cfg: SyntheticConfig,
    catalogue: Catalogue,
    lengths: np.ndarray,
    first_user_id: int,
    rng: np.random.Generator,
    start_epoch_s: int,
    scratch: _Scratch,
) -> pa.Table:
    n_users = len(lengths)
    n_topics = len(catalogue.topic_start)
    # Longest users first: at step t the active users are a prefix, so no masking is needed.
    order = np.argsort(-lengths, kind="stable")
    lengths_sorted = lengths[order]
    max_len = int(lengths_sorted[0])
    # Rows are laid out user by user (sorted order), each user's interactions in time order:
    # user i's step t is row first_row[i] + t.
    first_row = np.concatenate([[0], np.cumsum(lengths_sorted)[:-1]])
    n_rows = int(lengths_sorted.sum())

    taste_cumsum_t = np.cumsum(rng.dirichlet(np.full(n_topics, TASTE_CONCENTRATION), size=n_users), axis=1).T.copy()
    positions = np.empty(n_rows, dtype=np.int64)
    noise_flat = np.empty(n_rows, dtype=bool)
    # The users drawn at step t: length >= t, one step past their last for those of length t (the
    # generator always drew so; the draws are kept, the random stream is the data). Stored: length > t.
    active_at = np.searchsorted(-lengths_sorted, -np.arange(max_len), side="right")
    stored_at = np.searchsorted(-lengths_sorted, -np.arange(max_len), side="left")

    # Users rarely consume an item twice in these logs (as in MovieLens): a repeat is redrawn from
    # the user's tastes a few times before it is let through (features de-duplicates what remains).
    seen = scratch.seen[:n_users]
    last = np.zeros(n_users, dtype=np.int64)
    past_end: list[tuple[np.ndarray, np.ndarray]] = []
    all_rows = np.arange(n_users)
    for t in range(max_len):
        n = int(active_at[t])
        rows = all_rows[:n]
        draw = rng.random(n)
        chosen = _sample_tastes(rng, catalogue, taste_cumsum_t[:, :n])
        if t > 0:
            follow = draw < cfg.sequential_strength
            succ = catalogue.successors[last[:n], rng.integers(0, SUCCESSORS_PER_ITEM, n)]
            chosen = np.where(follow, succ, chosen)
        for _ in range(REPEAT_REDRAWS):
            repeated = np.flatnonzero(seen[rows, chosen])
            if len(repeated) == 0:
                break
            chosen[repeated] = _sample_tastes(rng, catalogue, taste_cumsum_t[:, repeated])
        noise = draw > 1.0 - cfg.noise_rate
        chosen = np.where(noise, rng.integers(0, cfg.n_items, n), chosen)
        seen[rows, chosen] = True
        m = int(stored_at[t])
        at = first_row[:m] + t
        positions[at] = chosen[:m]
        noise_flat[at] = noise[:m]
        if m < n:
            past_end.append((rows[m:], chosen[m:]))
        # Noise does not move the user's "last item": a mis-click is not what they follow up on.
        last[:n] = np.where(noise, last[:n], chosen)
    user_of_row = np.repeat(np.arange(n_users), lengths_sorted)
    seen[user_of_row, positions] = False  # clean for the next chunk
    for past_rows, past_items in past_end:
        seen[past_rows, past_items] = False

    user_ids = first_user_id + order.astype(np.int64)[user_of_row]
    item_ids = catalogue.item_ids[positions]

    ratings = rng.choice(SIGNAL_RATINGS, size=len(item_ids), p=SIGNAL_RATING_PROBS)
    ratings[noise_flat] = rng.choice(NOISE_RATINGS, size=int(noise_flat.sum()))

    # Per-user activity rate; gaps are exponential around it, at least one second apart. One
    # exponential is drawn per cell of the users x max_len rectangle (the random stream, hence
    # the data, stays as it always was), but only each user's own cells are used.
    user_gap = rng.lognormal(np.log(MEAN_GAP_SECONDS), 1.0, size=n_users)
    exponentials = scratch.exponential_block((n_users, max_len))
    rng.standard_exponential(out=exponentials)  # = rng.exponential(1.0, size), drawn in place
    span_s = cfg.span_days * 86_400
    user_start = rng.integers(0, max(1, int(0.8 * span_s)), size=n_users)
    offsets = _time_offsets(exponentials, user_gap, user_start, lengths_sorted, span_s)
    seconds = start_epoch_s + user_start[user_of_row] + offsets

    return pa.table(
        {
            schema.USER: pa.array(user_ids, pa.int64()),
            schema.ITEM: pa.array(item_ids, pa.int64()),
            schema.TIMESTAMP: pa.array(seconds * 1_000_000, pa.int64()).cast(schema.TIMESTAMP_TYPE),
            schema.RATING: pa.array(ratings, pa.float32()),
            schema.SOURCE: _constant_strings("synthetic", n_rows),
        },
        schema=schema.raw_schema(pa.int64()),
    )


# Users (longest first) per block of the time computation: the block is as wide as its first user.
TIME_BLOCK_USERS = 256


def _time_offsets(
    exponentials: np.ndarray, user_gap: np.ndarray, user_start: np.ndarray, lengths_sorted: np.ndarray, span_s: int
) -> np.ndarray:
    """Seconds since each user's start, row by row: cumulative gaps, compressed to stay in the span.

    The arithmetic is that of the users x max_len rectangle (gaps, cumulative sums along each
    row, then the scale), done block by block on the columns the block's users reach: a running
    sum along a row depends only on the cells before it, so the values are the same to the bit.
    """
    pieces = []
    for lo in range(0, len(lengths_sorted), TIME_BLOCK_USERS):
        hi = min(lo + TIME_BLOCK_USERS, len(lengths_sorted))
        lengths = lengths_sorted[lo:hi]
        width = int(lengths[0])
        valid = np.arange(width)[None, :] < lengths[:, None]
        gaps = 1 + exponentials[lo:hi, :width] * user_gap[lo:hi, None]
        gaps[:, 0] = 0
        cumulative = np.cumsum(np.where(valid, gaps, 0), axis=1)
        # A very active user would run past the end of the span (or into the future): compress that
        # user's gaps so every timestamp stays inside [start_date, start_date + span_days).
        user_total = cumulative[np.arange(hi - lo), lengths - 1]
        room = (span_s - 1 - user_start[lo:hi]).astype(np.float64)
        scale = np.minimum(1.0, room / np.maximum(user_total, 1.0))
        pieces.append((cumulative * scale[:, None])[valid].astype(np.int64))
    return np.concatenate(pieces)


def _constant_strings(value: str, n: int) -> pa.Array:
    """n copies of one string, built from its buffers (a Python object per row cost ~0.1 s per 1M)."""
    data = value.encode()
    offsets = np.arange(n + 1, dtype=np.int32) * len(data)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data * n))


def generate(cfg: SyntheticConfig, seed: int) -> Iterator[pa.Table]:
    """Yield the interactions in chunks of `cfg.chunk_users` users (user ids 1..n_users)."""
    root = np.random.SeedSequence(seed)
    catalogue_seed, lengths_seed, chunks_seed = root.spawn(3)
    catalogue = build_catalogue(cfg, np.random.default_rng(catalogue_seed))
    lengths = sequence_lengths(cfg, np.random.default_rng(lengths_seed))
    start_epoch_s = int(dt.datetime.combine(cfg.start_date, dt.time(), tzinfo=dt.UTC).timestamp())
    n_chunks = n_chunks_for(cfg)
    scratch = _Scratch(min(users_per_chunk(cfg), len(lengths)), cfg.n_items)
    logger.info(
        "synthetic: %d interactions, %d users, %d items, %d chunk(s)",
        cfg.n_interactions, len(lengths), cfg.n_items, n_chunks,
    )
    for index, chunk_seed in enumerate(chunks_seed.spawn(n_chunks)):
        lo = index * users_per_chunk(cfg)
        hi = min(lo + users_per_chunk(cfg), len(lengths))
        yield _generate_chunk(
            cfg, catalogue, lengths[lo:hi], lo + 1, np.random.default_rng(chunk_seed), start_epoch_s, scratch
        )
