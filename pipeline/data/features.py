"""Stage `features`: validated interactions -> model-ready sequences, vocabularies and splits.

Steps, each counted in the stats so no row disappears unexplained:
1. implicit-feedback threshold (rating >= min_rating) on explicit ratings (a source whose rows all
   share one rating, such as a file without a rating column, keeps every row: `rating_threshold`);
2. per-user chronological order, then de-duplication of (user, item) pairs;
3. iterative k-core filtering (users and items with too few interactions);
4. ID vocabularies: index 0 is padding; with `vocab_from`, an earlier
   vocabulary is extended (new IDs appended) and never renumbered;
5. leave-one-out (last item test, second to last validation) or global
   temporal split; a split without train, validation or test users is refused here
   (`check_split`), not after the first training epoch.

Outputs in data/features/ (Parquet, zstd): interactions.parquet (one row per
kept interaction with its split), sequences.parquet (one row per user: item
indices in time order and how many of them are train/valid/test),
user_vocab.parquet, item_vocab.parquet, stats.json.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.core import schema
from pipeline.core.config import FeaturesConfig
from pipeline.core.errors import FeaturesError
from pipeline.core.io import Layout, atomic_dir, write_json, write_parquet

logger = logging.getLogger(__name__)

PADDING_INDEX = 0
USER_VOCAB_FILE = "user_vocab.parquet"
ITEM_VOCAB_FILE = "item_vocab.parquet"
SEQUENCES_FILE = "sequences.parquet"
INTERACTIONS_FILE = "interactions.parquet"
STATS_FILE = "stats.json"
SPLITS = ("train", "valid", "test")




@dataclass(frozen=True)
class FeaturesResult:
    features_dir: Path
    stats: dict


def apply_kcore(
    user_codes: np.ndarray, item_codes: np.ndarray, min_user: int, min_item: int, max_iterations: int
) -> tuple[np.ndarray, int]:
    """Boolean mask of rows in the (min_user, min_item)-core and the number of passes it took.

    Removing a sparse item can push a user under the threshold and vice versa,
    so filter until a pass removes nothing.
    """
    keep = np.ones(len(user_codes), dtype=bool)
    n_users = int(user_codes.max()) + 1 if len(user_codes) else 0
    n_items = int(item_codes.max()) + 1 if len(item_codes) else 0
    for iteration in range(1, max_iterations + 1):
        user_counts = np.bincount(user_codes[keep], minlength=n_users)
        item_counts = np.bincount(item_codes[keep], minlength=n_items)
        new_keep = keep & (user_counts[user_codes] >= min_user) & (item_counts[item_codes] >= min_item)
        if new_keep.sum() == keep.sum():
            return new_keep, iteration
        keep = new_keep
    raise FeaturesError(
        f"k-core filtering did not converge in {max_iterations} passes "
        f"(min_user_interactions={min_user}, min_item_interactions={min_item}); "
        "raise features.max_kcore_iterations"
    )


def build_vocab(ids_in_first_seen_order: pd.Series, previous: pd.DataFrame | None) -> pd.DataFrame:
    """Vocabulary (`id`, `index`) with index 0 reserved for padding.

    Previous entries keep their index; IDs not seen before are appended in the
    order given (first appearance), so an incremental run never renumbers.
    """
    unique_ids = pd.Series(pd.unique(ids_in_first_seen_order), name="id")
    if previous is None or previous.empty:
        first = PADDING_INDEX + 1
        return pd.DataFrame({"id": unique_ids, "index": np.arange(first, first + len(unique_ids), dtype=np.int32)})
    if previous["index"].min() < 1 or previous["index"].duplicated().any():
        raise FeaturesError("previous vocabulary is corrupt: indices must be unique and >= 1")
    new_ids = unique_ids[~unique_ids.isin(previous["id"])]
    start = int(previous["index"].max()) + 1
    appended = pd.DataFrame({"id": new_ids.to_numpy(), "index": np.arange(start, start + len(new_ids), dtype=np.int32)})
    return pd.concat([previous[["id", "index"]], appended], ignore_index=True)


def load_previous_vocab(vocab_dir: Path | None, name: str, ids: pd.Series) -> pd.DataFrame | None:
    if vocab_dir is None:
        return None
    path = vocab_dir / name
    if not path.exists():
        raise FeaturesError(f"features.vocab_from={vocab_dir}: {name} not found there")
    previous = pd.read_parquet(path)
    if len(previous) and len(ids) and pd.api.types.is_integer_dtype(previous["id"]) != pd.api.types.is_integer_dtype(ids):
        raise FeaturesError(
            f"{path}: IDs are {previous['id'].dtype} but the new interactions have {ids.dtype} IDs; "
            "an incremental run must keep the source's ID type"
        )
    return previous


def temporal_cuts(timestamps: np.ndarray, cfg: FeaturesConfig) -> tuple[float, float]:
    """The global temporal split's cut-off times (microseconds) over every kept interaction's timestamp."""
    valid_cut, test_cut = np.quantile(timestamps, [1 - cfg.split.valid_fraction - cfg.split.test_fraction, 1 - cfg.split.test_fraction])
    return float(valid_cut), float(test_cut)


def split_labels(
    lengths: np.ndarray, user_of_row: np.ndarray, timestamps: np.ndarray, cfg: FeaturesConfig, cuts: tuple[float, float] | None = None
) -> tuple[np.ndarray, dict]:
    """Per-row split label (0 train, 1 valid, 2 test) for rows sorted by user then time.

    `cuts`: the temporal cut-offs when `timestamps` are not every row (the out-of-core engine labels batches).
    """
    if cfg.split.strategy == "leave_one_out":
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        position_from_end = offsets[user_of_row + 1] - np.arange(len(user_of_row)) - 1
        has_holdout = lengths[user_of_row] >= 3  # shorter users train only: no history to predict from
        labels = np.where(has_holdout & (position_from_end == 0), 2, np.where(has_holdout & (position_from_end == 1), 1, 0))
        return labels.astype(np.int8), {"strategy": "leave_one_out"}
    # Global temporal split: one cut-off time for everybody, so no future leaks into training.
    valid_cut, test_cut = cuts if cuts is not None else temporal_cuts(timestamps, cfg)
    labels = np.where(timestamps >= test_cut, 2, np.where(timestamps >= valid_cut, 1, 0)).astype(np.int8)
    as_time = lambda v: pd.Timestamp(int(v), unit="us", tz="UTC").isoformat()  # noqa: E731
    return labels, {"strategy": "temporal", "valid_from": as_time(valid_cut), "test_from": as_time(test_cut)}


def interactions_table(user_index: np.ndarray, item_index: np.ndarray, timestamps_us: np.ndarray, ratings: np.ndarray,
                       labels: np.ndarray) -> pa.Table:
    """interactions.parquet's rows (grouped by user index, in time order)."""
    return pa.table({
        "user_idx": pa.array(user_index, pa.int32()),
        "item_idx": pa.array(item_index, pa.int32()),
        "timestamp": pa.array(timestamps_us, pa.int64()).cast(schema.TIMESTAMP_TYPE),
        "rating": pa.array(ratings, pa.float32()),
        "split": pa.DictionaryArray.from_arrays(pa.array(labels, pa.int8()), pa.array(SPLITS)),
    })


def sequences_table(users: np.ndarray, lengths: np.ndarray, item_index: np.ndarray, timestamps_us: np.ndarray,
                    per_user_split: np.ndarray) -> pa.Table:
    """sequences.parquet's rows: one per user of `users`, whose rows are `item_index`/`timestamps_us` in order."""
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    return pa.table({
        "user_idx": pa.array(users, pa.int32()),
        "items": pa.ListArray.from_arrays(offsets, pa.array(item_index, pa.int32())),
        "timestamps_s": pa.ListArray.from_arrays(offsets, pa.array(timestamps_us // 1_000_000, pa.int64())),
        "n_train": pa.array(per_user_split[:, 0], pa.int32()),
        "n_valid": pa.array(per_user_split[:, 1], pa.int32()),
        "n_test": pa.array(per_user_split[:, 2], pa.int32()),
    })


def rating_threshold(min_rating: float | None, ratings: pd.Series) -> float | None:
    """The implicit-feedback threshold to apply: `min_rating` when the source has explicit ratings, else None.

    A source without ratings gives every row the same weight (a file without a rating column: 1.0,
    pipeline/data/sources/convert.py), and a threshold over one value either keeps every row or drops
    them all; it is a preference signal only where ratings differ (MovieLens 1-5, the synthetic
    source's 3-5 signal and 1-2 noise, event weights). So one rating value means implicit feedback:
    every row is kept, with a warning if the threshold would have dropped them.
    """
    if min_rating is None or ratings.empty:
        return min_rating
    low, high = float(ratings.min()), float(ratings.max())
    if low != high:
        return min_rating
    if low < min_rating:
        logger.warning("features: every rating is %g (implicit feedback, no explicit ratings): features.min_rating=%g "
                       "is not applied, every row is kept", low, min_rating)
    return None


def check_split(per_user_split: np.ndarray, cfg: FeaturesConfig) -> None:
    """Refuse a split that train or evaluate cannot use, before they start: which setting to change.

    Training needs users with 2+ train items; validation (early stopping) and test need users with a
    held-out item and some history before it (pipeline/data/sequences.py: evaluation_rows).
    """
    n_train, n_valid, n_test = per_user_split[:, 0], per_user_split[:, 1], per_user_split[:, 2]
    counts = {"train": int((n_train >= 2).sum()), "valid": int(((n_valid > 0) & (n_train > 0)).sum()),
              "test": int(((n_test > 0) & (n_train + n_valid > 0)).sum())}
    empty = [name for name, count in counts.items() if count == 0]
    if not empty:
        return
    if cfg.split.strategy == "leave_one_out":
        fix = ("leave_one_out holds out the last two items of users with 3+ interactions: raise "
               f"features.min_user_interactions (now {cfg.min_user_interactions}) to 3 or more, or use more data")
    else:
        fix = (f"the temporal cut-offs (features.split.valid_fraction={cfg.split.valid_fraction}, "
               f"test_fraction={cfg.split.test_fraction}) leave no user with both history and a held-out item there: "
               "change them, or use features.split.strategy=leave_one_out")
    raise FeaturesError(f"the split leaves no {' and no '.join(empty)} users ({counts} of {len(per_user_split)}); {fix}")


def percentiles(lengths: np.ndarray) -> dict:
    if len(lengths) == 0:
        return {}
    qs = np.percentile(lengths, [50, 90, 95, 99])
    return {"mean": float(lengths.mean()), "p50": float(qs[0]), "p90": float(qs[1]), "p95": float(qs[2]), "p99": float(qs[3]),
            "max": int(lengths.max()), "min": int(lengths.min())}


def run_features(cfg: FeaturesConfig, layout: Layout) -> FeaturesResult:
    started = time.perf_counter()
    source = layout.validated_interactions
    if not source.exists():
        raise FeaturesError(f"{source} not found: run the validate stage first")
    frame = pd.read_parquet(source, columns=[schema.USER, schema.ITEM, schema.TIMESTAMP, schema.RATING])
    rows_in = len(frame)
    counts: dict[str, int] = {"rows_in": rows_in}

    threshold = rating_threshold(cfg.min_rating, frame[schema.RATING])
    if threshold is not None:
        frame = frame[frame[schema.RATING] >= threshold]
    counts["dropped_below_min_rating"] = rows_in - len(frame)

    # Chronological per user; the stable sort keeps the source order for equal timestamps.
    frame = frame.sort_values([schema.USER, schema.TIMESTAMP], kind="stable")
    before = len(frame)
    if cfg.dedupe != "none":
        frame = frame.drop_duplicates([schema.USER, schema.ITEM], keep=cfg.dedupe)
    counts["dropped_duplicate_pairs"] = before - len(frame)

    user_codes, _ = pd.factorize(frame[schema.USER])
    item_codes, _ = pd.factorize(frame[schema.ITEM])
    keep, kcore_passes = apply_kcore(user_codes, item_codes, cfg.min_user_interactions, cfg.min_item_interactions, cfg.max_kcore_iterations)
    counts["dropped_kcore"] = int((~keep).sum())
    frame = frame[keep]
    counts["rows_out"] = len(frame)
    if frame.empty:
        raise FeaturesError(
            f"no interactions left after filtering ({counts}); lower features.min_rating, "
            "min_user_interactions or min_item_interactions"
        )

    vocab_dir = Path(cfg.vocab_from) if cfg.vocab_from else None
    # Vocabularies list IDs by first appearance in time, so appending later data keeps earlier indices.
    by_time = frame.sort_values(schema.TIMESTAMP, kind="stable")
    user_vocab = build_vocab(by_time[schema.USER], load_previous_vocab(vocab_dir, USER_VOCAB_FILE, frame[schema.USER]))
    item_vocab = build_vocab(by_time[schema.ITEM], load_previous_vocab(vocab_dir, ITEM_VOCAB_FILE, frame[schema.ITEM]))

    user_index = frame[schema.USER].map(pd.Series(user_vocab["index"].to_numpy(), index=user_vocab["id"])).to_numpy(np.int32)
    item_index = frame[schema.ITEM].map(pd.Series(item_vocab["index"].to_numpy(), index=item_vocab["id"])).to_numpy(np.int32)
    timestamps_us = frame[schema.TIMESTAMP].dt.tz_convert(None).to_numpy("datetime64[us]").astype(np.int64)

    # Rows grouped by user index, in time order within each user.
    order = np.lexsort((np.arange(len(frame)), timestamps_us, user_index))
    user_index, item_index, timestamps_us = user_index[order], item_index[order], timestamps_us[order]
    ratings = frame[schema.RATING].to_numpy(np.float32)[order]
    users, starts, lengths = np.unique(user_index, return_index=True, return_counts=True)
    user_of_row = np.repeat(np.arange(len(users)), lengths)
    labels, split_info = split_labels(lengths, user_of_row, timestamps_us, cfg)
    per_user_split = np.zeros((len(users), 3), dtype=np.int64)
    np.add.at(per_user_split, (user_of_row, labels), 1)
    check_split(per_user_split, cfg)

    interactions = interactions_table(user_index, item_index, timestamps_us, ratings, labels)
    sequences = sequences_table(users, lengths, item_index, timestamps_us, per_user_split)

    stats = features_stats(
        n_items=int(np.unique(item_index).size), counts=counts, user_vocab=user_vocab, item_vocab=item_vocab,
        vocab_dir=vocab_dir, threshold=threshold, kcore_passes=kcore_passes, split_info=split_info,
        per_user_split=per_user_split, lengths=lengths)
    with atomic_dir(layout.features_dir) as tmp:
        write_parquet(interactions, tmp / INTERACTIONS_FILE)
        write_parquet(sequences, tmp / SEQUENCES_FILE)
        write_parquet(user_vocab, tmp / USER_VOCAB_FILE)
        write_parquet(item_vocab, tmp / ITEM_VOCAB_FILE)
        # What the inputs determine only: DVC caches data/features, and a timing here would change its
        # hash on every rerun (and rerun every later stage). The time goes to the report below.
        write_json(stats, tmp / STATS_FILE)
    return report_features(stats, layout, started, "pandas")


def features_stats(*, n_items: int, counts: dict, user_vocab: pd.DataFrame, item_vocab: pd.DataFrame, vocab_dir: Path | None,
                   threshold: float | None, kcore_passes: int, split_info: dict, per_user_split: np.ndarray,
                   lengths: np.ndarray) -> dict:
    """data/features/stats.json (both engines): what the inputs determine, nothing that varies between runs."""
    n_users = len(lengths)
    return {
        "users": n_users,
        "items": n_items,
        "interactions": counts["rows_out"],
        "density": counts["rows_out"] / (n_users * n_items),
        "user_vocab_size": len(user_vocab),
        "item_vocab_size": len(item_vocab),
        "vocab_extended_from": str(vocab_dir) if vocab_dir else None,
        "min_rating_applied": threshold,  # null: no threshold, or no explicit ratings to apply it to
        "kcore_passes": kcore_passes,
        "rows": counts,
        "split": {**split_info, **{name: int(per_user_split[:, i].sum()) for i, name in enumerate(SPLITS)}},
        "sequence_length": percentiles(lengths),
    }


def report_features(stats: dict, layout: Layout, started: float, engine: str) -> FeaturesResult:
    """reports/features.json: the cached stats plus what does not belong in data/features (engine, wall time)."""
    stats = {**stats, "engine": engine, "seconds": round(time.perf_counter() - started, 3)}
    write_json(stats, layout.reports_dir / "features.json")
    logger.info(
        "features (%s): %d interactions, %d users, %d items (density %.4f) in %.1fs -> %s", engine,
        stats["interactions"], stats["users"], stats["items"], stats["density"], stats["seconds"], layout.features_dir,
    )
    return FeaturesResult(features_dir=layout.features_dir, stats=stats)
