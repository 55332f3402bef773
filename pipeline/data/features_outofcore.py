"""Stage `features` in SQL (params `data_engine: duckdb` or `spark`): the same files as `features.run_features`.

DuckDB (bounded memory, spilling beyond its limit: `duckdb_session`) or Spark (`spark_session`)
does the row work, in the SQL both read (`sql_engine`): rating threshold, de-duplication, the
iterative k-core, the vocabularies' first-seen order and the final sort. "Source order" is the
validated file's row number (`r`), so every tie is broken
as the pandas path's stable sorts break it. The sorted rows then stream through Python in
batches, user by user, into interactions.parquet and sequences.parquet, built by the same
functions as in `features` (`split_labels`, `interactions_table`, `sequences_table`).

Held in Python: the vocabularies and per-user counts (one entry per user or item, not per
interaction), one batch of rows (on Spark the whole sorted result, collected as Arrow), and for the
temporal split every kept timestamp (8 bytes a row, for the exact same quantiles as numpy).
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
from pipeline.core.config import FeaturesConfig, SparkConfig
from pipeline.core.errors import FeaturesError
from pipeline.core.io import Layout, atomic_dir, parquet_stream, write_json, write_parquet
from pipeline.data import sql_engine
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
    run_features,
    sequences_table,
    split_labels,
    temporal_cuts,
)
from pipeline.data.sql_engine import SqlEngine

logger = logging.getLogger(__name__)

USER, ITEM, T, R = (f'"{c}"' for c in (schema.USER, schema.ITEM, schema.TIMESTAMP, schema.RATING))


def _count(con: SqlEngine, table: str) -> int:
    return int(con.rows(f"SELECT count(*) FROM {table}")[0][0])


def _kcore(con: SqlEngine, cfg: FeaturesConfig, table: str) -> tuple[str, int]:
    """`table` filtered to its (min_user, min_item)-core, as `features.apply_kcore`: the core's table and the passes."""
    rows = _count(con, table)
    for iteration in range(1, cfg.max_kcore_iterations + 1):
        core = f"kcore_{iteration}"
        con.materialize(core, f"""SELECT * FROM {table}
            WHERE {USER} IN (SELECT {USER} FROM {table} GROUP BY {USER} HAVING count(*) >= {cfg.min_user_interactions})
              AND {ITEM} IN (SELECT {ITEM} FROM {table} GROUP BY {ITEM} HAVING count(*) >= {cfg.min_item_interactions})""")
        con.drop(table)
        table = core
        remaining = _count(con, table)
        if remaining == rows:
            return table, iteration
        rows = remaining
    raise FeaturesError(
        f"k-core filtering did not converge in {cfg.max_kcore_iterations} passes "
        f"(min_user_interactions={cfg.min_user_interactions}, min_item_interactions={cfg.min_item_interactions}); "
        "raise features.max_kcore_iterations"
    )


def _first_seen(con: SqlEngine, table: str, column: str) -> pd.Series:
    """IDs in order of first appearance in (time, user, source order), as `features` orders them."""
    first = f"min({con.dialect.struct}({T}, {USER}, r))"
    return con.arrow(f"SELECT {column} AS id FROM {table} GROUP BY {column} ORDER BY {first}").to_pandas()["id"]


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


def _stream(con: SqlEngine, sink: _Sink) -> None:
    """Rows by (user index, time, source order), a batch at a time; a user's rows never straddle two writes."""
    reader = con.batches(f"""SELECT user_idx, item_idx, {con.dialect.epoch_us}({T}) AS ts, {R} AS rating FROM indexed
                            ORDER BY user_idx, {T}, r""")
    carry: dict[str, np.ndarray] | None = None
    for batch in reader:
        if not batch.num_rows:
            continue
        rows = {name: batch.column(name).to_numpy() for name in ("user_idx", "item_idx", "ts", "rating")}
        if carry is not None:
            rows = {name: np.concatenate([carry[name], rows[name]]) for name in rows}
        last_user_start = int(np.searchsorted(rows["user_idx"], rows["user_idx"][-1]))
        sink.write({name: values[:last_user_start] for name, values in rows.items()})
        carry = {name: values[last_user_start:] for name, values in rows.items()}
    if carry is not None:
        sink.write(carry)


def run_features_out_of_core(cfg: FeaturesConfig, layout: Layout, engine: str = "duckdb",
                             spark: SparkConfig | None = None) -> FeaturesResult:
    """`engine`: duckdb or spark (params `data_engine`), with the `spark` settings for spark."""
    started = time.perf_counter()
    source_path = layout.validated_interactions
    if not source_path.exists():
        raise FeaturesError(f"{source_path} not found: run the validate stage first")
    source = "validated"
    with sql_engine.connect(engine, layout.root / "data", spark) as con:
        con.parquet(source, source_path)
        low, high, rows_in = con.rows(f"SELECT min({R}), max({R}), count(*) FROM {source}")[0]
        counts: dict[str, int] = {"rows_in": int(rows_in)}
        threshold = rating_threshold(cfg.min_rating, pd.Series([low, high] if rows_in else [], dtype="float64"))
        # FLOAT: pandas compares the float32 ratings with the threshold as float32.
        where = f"WHERE {R} >= CAST({float(threshold)!r} AS FLOAT)" if threshold is not None else ""
        columns = f"{USER}, {ITEM}, {T}, {R}"
        con.materialize("rated", f"SELECT {columns}, file_row_number AS r FROM {source} {where}")
        rated = _count(con, "rated")
        counts["dropped_below_min_rating"] = rows_in - rated
        kept = "rated"
        if cfg.dedupe != "none":
            direction = "" if cfg.dedupe == "first" else " DESC"
            con.materialize("deduped", f"""SELECT {columns}, r FROM (SELECT *, row_number() OVER (
                PARTITION BY {USER}, {ITEM} ORDER BY {T}{direction}, r{direction}) AS copy FROM rated) WHERE copy = 1""")
            con.drop("rated")
            kept = "deduped"
        deduped = _count(con, kept)
        counts["dropped_duplicate_pairs"] = rated - deduped
        kept, kcore_passes = _kcore(con, cfg, kept)
        counts["rows_out"] = _count(con, kept)
        counts["dropped_kcore"] = deduped - counts["rows_out"]
        counts = {k: counts[k] for k in ("rows_in", "dropped_below_min_rating", "dropped_duplicate_pairs", "dropped_kcore", "rows_out")}
        if counts["rows_out"] == 0:
            raise FeaturesError(
                f"no interactions left after filtering ({counts}); lower features.min_rating, "
                "min_user_interactions or min_item_interactions"
            )

        vocab_dir = Path(cfg.vocab_from) if cfg.vocab_from else None
        user_ids, item_ids = _first_seen(con, kept, USER), _first_seen(con, kept, ITEM)
        user_vocab = build_vocab(user_ids, load_previous_vocab(vocab_dir, USER_VOCAB_FILE, user_ids))
        item_vocab = build_vocab(item_ids, load_previous_vocab(vocab_dir, ITEM_VOCAB_FILE, item_ids))
        con.register("user_vocab", pa.Table.from_pandas(user_vocab, preserve_index=False))
        con.register("item_vocab", pa.Table.from_pandas(item_vocab, preserve_index=False))
        con.materialize("indexed", f"""SELECT u."index" AS user_idx, i."index" AS item_idx, {T}, {R}, r
            FROM {kept} k JOIN user_vocab u ON k.{USER} = u.id JOIN item_vocab i ON k.{ITEM} = i.id""")
        con.drop(kept)
        n_items = int(con.rows("SELECT count(DISTINCT item_idx) FROM indexed")[0][0])
        cuts = None
        if cfg.split.strategy == "temporal":
            timestamps = con.arrow(f"SELECT {con.dialect.epoch_us}({T}) AS ts FROM indexed").column("ts").to_numpy()
            cuts = temporal_cuts(timestamps, cfg)

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
    return report_features(stats, layout, started, engine)


def run_features_on(engine: str, cfg: FeaturesConfig, layout: Layout, spark: SparkConfig | None = None) -> FeaturesResult:
    """Stage `features` on params `data_engine`: pandas in memory (`features`), duckdb or spark in SQL."""
    if engine == "pandas":
        return run_features(cfg, layout)
    return run_features_out_of_core(cfg, layout, engine, spark)
