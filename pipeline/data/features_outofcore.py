"""Stage `features` out of core (params `data_engine: duckdb`): the same files as `features.run_features`.

DuckDB does the row work with bounded memory, spilling beyond its limit (`duckdb_session`):
rating threshold, de-duplication, the iterative k-core, the vocabularies' first-seen order and
the final sort. "Source order" is the validated file's row number (`r`), so every tie is broken
as the pandas path's stable sorts break it. The sorted rows then stream through Python in
batches, user by user, into interactions.parquet and sequences.parquet, built by the same
functions as in `features` (`split_labels`, `interactions_table`, `sequences_table`).

Held in Python: the vocabularies and per-user counts (one entry per user or item, not per
interaction), one batch of rows, and for the temporal split every kept timestamp (8 bytes a
row, for the exact same quantiles as numpy).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.core import schema
from pipeline.core.config import FeaturesConfig
from pipeline.core.errors import FeaturesError
from pipeline.core.io import Layout, atomic_dir, parquet_stream, write_json, write_parquet
from pipeline.data import duckdb_session
from pipeline.data.duckdb_session import sql_path
from pipeline.data.features import (
    INTERACTIONS_FILE,
    ITEM_VOCAB_FILE,
    SEQUENCES_FILE,
    STATS_FILE,
    USER_VOCAB_FILE,
    FeaturesResult,
    build_vocab,
    check_split,
    features_stats,
    interactions_table,
    load_previous_vocab,
    rating_threshold,
    report_features,
    sequences_table,
    split_labels,
    temporal_cuts,
)

logger = logging.getLogger(__name__)

USER, ITEM, T, R = (f'"{c}"' for c in (schema.USER, schema.ITEM, schema.TIMESTAMP, schema.RATING))


def _count(con: Any, table: str) -> int:
    return int(con.sql(f"SELECT count(*) FROM {table}").fetchall()[0][0])


def _kcore(con: Any, cfg: FeaturesConfig) -> int:
    """Filter table `kept` to its (min_user, min_item)-core, as `features.apply_kcore`; returns the passes."""
    rows = _count(con, "kept")
    for iteration in range(1, cfg.max_kcore_iterations + 1):
        con.execute(f"""CREATE OR REPLACE TEMP TABLE next_kept AS SELECT * FROM kept
            WHERE {USER} IN (SELECT {USER} FROM kept GROUP BY ALL HAVING count(*) >= {cfg.min_user_interactions})
              AND {ITEM} IN (SELECT {ITEM} FROM kept GROUP BY ALL HAVING count(*) >= {cfg.min_item_interactions})""")
        con.execute("DROP TABLE kept; ALTER TABLE next_kept RENAME TO kept")
        remaining = _count(con, "kept")
        if remaining == rows:
            return iteration
        rows = remaining
    raise FeaturesError(
        f"k-core filtering did not converge in {cfg.max_kcore_iterations} passes "
        f"(min_user_interactions={cfg.min_user_interactions}, min_item_interactions={cfg.min_item_interactions}); "
        "raise features.max_kcore_iterations"
    )


def _first_seen(con: Any, column: str) -> pd.Series:
    """IDs in order of first appearance in (time, user, source order), as `features` orders them."""
    ids = con.sql(f"SELECT {column} AS id FROM kept GROUP BY {column} ORDER BY min({{'t': {T}, 'u': {USER}, 'r': r}})").arrow().read_all()
    return ids.to_pandas()["id"]


class _Sink:
    """Sorted rows in, user by user: interactions and sequences batches written, per-user counts kept."""

    def __init__(self, interactions: Any, sequences: Any, cfg: FeaturesConfig, cuts: tuple[float, float] | None) -> None:
        self.interactions, self.sequences, self.cfg, self.cuts = interactions, sequences, cfg, cuts
        self.lengths: list[np.ndarray] = []
        self.splits: list[np.ndarray] = []
        self.split_info: dict = {}

    def write(self, rows: dict[str, np.ndarray]) -> None:
        if not len(rows["user_idx"]):
            return
        users, lengths = np.unique(rows["user_idx"], return_counts=True)  # rows are sorted by user
        user_of_row = np.repeat(np.arange(len(users)), lengths)
        labels, self.split_info = split_labels(lengths, user_of_row, rows["ts"], self.cfg, self.cuts)
        per_user_split = np.zeros((len(users), 3), dtype=np.int64)
        np.add.at(per_user_split, (user_of_row, labels), 1)
        self.interactions.write_table(interactions_table(rows["user_idx"], rows["item_idx"], rows["ts"], rows["rating"], labels))
        self.sequences.write_table(sequences_table(users, lengths, rows["item_idx"], rows["ts"], per_user_split))
        self.lengths.append(lengths)
        self.splits.append(per_user_split)


def _stream(con: Any, sink: _Sink) -> None:
    """Rows by (user index, time, source order), a batch at a time; a user's rows never straddle two writes."""
    reader = con.sql(f"""SELECT user_idx, item_idx, epoch_us({T}) AS ts, {R} AS rating FROM indexed
                        ORDER BY user_idx, {T}, r""").fetch_record_batch(duckdb_session.BATCH_ROWS)
    carry: dict[str, np.ndarray] | None = None
    for batch in reader:
        rows = {name: batch.column(name).to_numpy() for name in ("user_idx", "item_idx", "ts", "rating")}
        if carry is not None:
            rows = {name: np.concatenate([carry[name], rows[name]]) for name in rows}
        last_user_start = int(np.searchsorted(rows["user_idx"], rows["user_idx"][-1]))
        sink.write({name: values[:last_user_start] for name, values in rows.items()})
        carry = {name: values[last_user_start:] for name, values in rows.items()}
    if carry is not None:
        sink.write(carry)


def run_features_out_of_core(cfg: FeaturesConfig, layout: Layout) -> FeaturesResult:
    started = time.perf_counter()
    source_path = layout.validated_interactions
    if not source_path.exists():
        raise FeaturesError(f"{source_path} not found: run the validate stage first")
    source = f"read_parquet({sql_path(source_path)}, file_row_number = true)"
    with duckdb_session.connect(layout.root / "data") as con:
        low, high, rows_in = con.sql(f"SELECT min({R}), max({R}), count(*) FROM {source}").fetchall()[0]
        counts: dict[str, int] = {"rows_in": int(rows_in)}
        threshold = rating_threshold(cfg.min_rating, pd.Series([low, high] if rows_in else [], dtype="float64"))
        # FLOAT: pandas compares the float32 ratings with the threshold as float32.
        where = f"WHERE {R} >= CAST({float(threshold)!r} AS FLOAT)" if threshold is not None else ""
        con.execute(f"CREATE TEMP TABLE rated AS SELECT {USER}, {ITEM}, {T}, {R}, file_row_number AS r FROM {source} {where}")
        rated = _count(con, "rated")
        counts["dropped_below_min_rating"] = rows_in - rated
        if cfg.dedupe == "none":
            con.execute("ALTER TABLE rated RENAME TO kept")
        else:
            direction = "" if cfg.dedupe == "first" else " DESC"
            con.execute(f"""CREATE TEMP TABLE kept AS SELECT * FROM rated QUALIFY row_number() OVER (
                PARTITION BY {USER}, {ITEM} ORDER BY {T}{direction}, r{direction}) = 1""")
            con.execute("DROP TABLE rated")
        counts["dropped_duplicate_pairs"] = rated - _count(con, "kept")
        deduped = _count(con, "kept")
        kcore_passes = _kcore(con, cfg)
        counts["rows_out"] = _count(con, "kept")
        counts["dropped_kcore"] = deduped - counts["rows_out"]
        counts = {k: counts[k] for k in ("rows_in", "dropped_below_min_rating", "dropped_duplicate_pairs", "dropped_kcore", "rows_out")}
        if counts["rows_out"] == 0:
            raise FeaturesError(
                f"no interactions left after filtering ({counts}); lower features.min_rating, "
                "min_user_interactions or min_item_interactions"
            )

        vocab_dir = Path(cfg.vocab_from) if cfg.vocab_from else None
        user_ids, item_ids = _first_seen(con, USER), _first_seen(con, ITEM)
        user_vocab = build_vocab(user_ids, load_previous_vocab(vocab_dir, USER_VOCAB_FILE, user_ids))
        item_vocab = build_vocab(item_ids, load_previous_vocab(vocab_dir, ITEM_VOCAB_FILE, item_ids))
        con.register("user_vocab", pa.Table.from_pandas(user_vocab, preserve_index=False))
        con.register("item_vocab", pa.Table.from_pandas(item_vocab, preserve_index=False))
        con.execute(f"""CREATE TEMP TABLE indexed AS SELECT u."index" AS user_idx, i."index" AS item_idx, {T}, {R}, r
            FROM kept JOIN user_vocab u ON kept.{USER} = u.id JOIN item_vocab i ON kept.{ITEM} = i.id""")
        n_items = int(con.sql("SELECT count(DISTINCT item_idx) FROM indexed").fetchall()[0][0])
        cuts = None
        if cfg.split.strategy == "temporal":
            cuts = temporal_cuts(con.sql(f"SELECT epoch_us({T}) AS ts FROM indexed").fetchnumpy()["ts"], cfg)

        with atomic_dir(layout.features_dir) as tmp:
            interactions_schema = interactions_table(*(np.zeros(0, np.int64),) * 4, np.zeros(0, np.int8)).schema
            sequences_schema = sequences_table(*(np.zeros(0, np.int64),) * 4, np.zeros((0, 3), np.int64)).schema
            with (parquet_stream(tmp / INTERACTIONS_FILE, interactions_schema) as interactions,
                  parquet_stream(tmp / SEQUENCES_FILE, sequences_schema) as sequences):
                sink = _Sink(interactions, sequences, cfg, cuts)
                _stream(con, sink)
            lengths, per_user_split = np.concatenate(sink.lengths), np.concatenate(sink.splits)
            check_split(per_user_split, cfg)
            stats = features_stats(
                n_items=n_items, counts=counts, user_vocab=user_vocab, item_vocab=item_vocab, vocab_dir=vocab_dir,
                threshold=threshold, kcore_passes=kcore_passes, split_info=sink.split_info,
                per_user_split=per_user_split, lengths=lengths)
            write_parquet(user_vocab, tmp / USER_VOCAB_FILE)
            write_parquet(item_vocab, tmp / ITEM_VOCAB_FILE)
            write_json(stats, tmp / STATS_FILE)
    return report_features(stats, layout, started, "duckdb")
