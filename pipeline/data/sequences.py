"""User sequences in memory, and the batches training and evaluation iterate over.

Sequences are kept flat (one int32 array of item indices plus offsets), as
features wrote them; a batch is built by slicing, never by Python objects per
interaction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline.data.features import ITEM_VOCAB_FILE, SEQUENCES_FILE, USER_VOCAB_FILE


@dataclass(frozen=True)
class SequenceData:
    users: np.ndarray  # int64[n_users] user vocabulary indices
    offsets: np.ndarray  # int64[n_users + 1] into items
    items: np.ndarray  # int64[n_interactions] item indices, each user's in time order
    n_train: np.ndarray  # int64[n_users]
    n_valid: np.ndarray
    n_test: np.ndarray
    n_items: int  # size of the item vocabulary (indices 1..n_items)
    n_user_index: int  # size of the user vocabulary (indices 1..n_user_index)

    def prefix_length(self, split: str) -> np.ndarray:
        """How many items of each user's sequence are visible before predicting `split`'s target."""
        if split == "valid":
            return self.n_train
        if split == "test":
            return self.n_train + self.n_valid
        if split == "all":
            return self.n_train + self.n_valid + self.n_test
        raise ValueError(f"unknown split {split!r}")

    def train_item_counts(self) -> np.ndarray:
        """Interactions per item index in the training part (index 0 = padding = 0)."""
        return np.bincount(self.train_pairs()[1], minlength=self.n_items + 1)

    def train_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """(user index, item index) of every training interaction."""
        lengths = self.offsets[1:] - self.offsets[:-1]
        position = np.arange(len(self.items)) - np.repeat(self.offsets[:-1], lengths)
        mask = position < np.repeat(self.n_train, lengths)
        return np.repeat(self.users, lengths)[mask], self.items[mask]


def load_sequences(features_dir: str | Path) -> SequenceData:
    features_dir = Path(features_dir)
    table = pq.read_table(features_dir / SEQUENCES_FILE, columns=["user_idx", "items", "n_train", "n_valid", "n_test"])
    items_column = table.column("items").combine_chunks()
    n_items = int(pq.read_metadata(features_dir / ITEM_VOCAB_FILE).num_rows)
    n_users = int(pq.read_metadata(features_dir / USER_VOCAB_FILE).num_rows)
    return SequenceData(
        users=table.column("user_idx").to_numpy().astype(np.int64),
        offsets=items_column.offsets.to_numpy().astype(np.int64),
        items=items_column.values.to_numpy().astype(np.int64),
        n_train=table.column("n_train").to_numpy().astype(np.int64),
        n_valid=table.column("n_valid").to_numpy().astype(np.int64),
        n_test=table.column("n_test").to_numpy().astype(np.int64),
        n_items=n_items,
        n_user_index=n_users,
    )


@dataclass
class Batch:
    rows: np.ndarray  # positions in SequenceData of the users in this batch
    inputs: torch.Tensor  # (B, L) right-padded item indices
    lengths: torch.Tensor  # (B,)
    targets: torch.Tensor  # (B, L) next items for training, padding where none; (B,) for evaluation
    users: torch.Tensor  # (B,) user vocabulary indices

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return Batch(
            self.rows,
            self.inputs.to(device, non_blocking=non_blocking),
            self.lengths.to(device, non_blocking=non_blocking),
            self.targets.to(device, non_blocking=non_blocking),
            self.users.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> Batch:
        return Batch(self.rows, self.inputs.pin_memory(), self.lengths.pin_memory(), self.targets.pin_memory(), self.users.pin_memory())


# What every model offers evaluation and serving: a batch -> (B, n_items + 1) item scores, on any device.
ScoreFn = Callable[[Batch], torch.Tensor]


def _windows(data: SequenceData, rows: np.ndarray, ends: np.ndarray, window: np.ndarray) -> np.ndarray:
    """(B, max(window)) right-padded matrix of items[end - window : end] per row."""
    width = int(window.max()) if len(window) else 0
    out = np.zeros((len(rows), width), dtype=np.int64)
    column = np.arange(width)
    valid = column[None, :] < window[:, None]
    source = data.offsets[rows][:, None] + (ends - window)[:, None] + column[None, :]
    out[valid] = data.items[source[valid]]
    return out


def training_batches(
    data: SequenceData, batch_size: int, max_len: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1
) -> Iterator[Batch]:
    """Next-item training batches on each user's training prefix, bucketed by length.

    Users are ordered by window length (ties broken at random) and cut into batches,
    so a batch pads only to its own longest sequence; batch order is shuffled. The
    order depends on (seed, epoch) alone, so a resumed run sees the same batches.
    With `world_size` > 1, every rank builds the same global batches and keeps its
    own slice of rows of each: together the ranks compute exactly the global batch.
    """
    rng = np.random.default_rng([seed, epoch])
    eligible = np.flatnonzero(data.n_train >= 2)
    window = np.minimum(data.n_train[eligible] - 1, max_len)
    order = np.lexsort((rng.random(len(eligible)), window))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for index in rng.permutation(len(batches)):
        if len(batches[index]) < world_size:
            continue  # every rank must get rows, or the collective calls would not line up
        chosen = batches[index][rank::world_size]
        rows, win = eligible[chosen], window[chosen]
        if len(rows) == 0:
            continue
        ends = data.n_train[rows]
        inputs = _windows(data, rows, ends - 1, win)
        targets = _windows(data, rows, ends, win)
        yield Batch(
            rows=rows,
            inputs=torch.from_numpy(inputs),
            lengths=torch.from_numpy(win),
            targets=torch.from_numpy(targets),
            users=torch.from_numpy(data.users[rows]),
        )


def n_training_batches(data: SequenceData, batch_size: int) -> int:
    return -(-int((data.n_train >= 2).sum()) // batch_size)


def evaluation_rows(data: SequenceData, split: str) -> np.ndarray:
    """Users evaluated on `split`: they have its held-out item and some history before it."""
    has_target = data.n_valid if split == "valid" else data.n_test
    return np.flatnonzero((has_target > 0) & (data.prefix_length(split) > 0))


def evaluation_batches(data: SequenceData, split: str, batch_size: int, max_len: int,
                       rows: np.ndarray | None = None) -> Iterator[Batch]:
    """One example per user that has a `split` target: the last max_len items before it as input.

    `rows`: the users to take, in this order (default: `evaluation_rows`, in data order)."""
    prefix = data.prefix_length(split)
    eligible = evaluation_rows(data, split) if rows is None else rows
    for start in range(0, len(eligible), batch_size):
        rows = eligible[start : start + batch_size]
        ends = prefix[rows]
        window = np.minimum(ends, max_len)
        yield Batch(
            rows=rows,
            inputs=torch.from_numpy(_windows(data, rows, ends, window)),
            lengths=torch.from_numpy(window),
            targets=torch.from_numpy(data.items[data.offsets[rows] + ends]),
            users=torch.from_numpy(data.users[rows]),
        )


def seen_items(data: SequenceData, rows: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(batch row, item) pairs of everything each user interacted with before `split`'s target."""
    ends = data.prefix_length(split)[rows]
    batch_rows = np.repeat(np.arange(len(rows)), ends)
    starts = np.repeat(data.offsets[rows], ends)
    within = np.arange(int(ends.sum())) - np.repeat(np.cumsum(ends) - ends, ends)
    return batch_rows, data.items[starts + within]
