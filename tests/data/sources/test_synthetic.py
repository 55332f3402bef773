import hashlib

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipeline.core import schema
from pipeline.core.config import SyntheticConfig
from pipeline.data.sources.synthetic import build_catalogue, generate, sequence_lengths


def _frame(cfg: SyntheticConfig, seed: int = 7) -> pd.DataFrame:
    return pa.concat_tables(generate(cfg, seed)).to_pandas()


def test_exact_size_schema_and_determinism():
    cfg = SyntheticConfig(n_interactions=12_345, n_items=300, chunk_users=100)
    first = pa.concat_tables(generate(cfg, 1))
    assert first.num_rows == 12_345
    assert first.schema == schema.raw_schema(pa.int64())
    assert first.equals(pa.concat_tables(generate(cfg, 1)))
    assert not first.equals(pa.concat_tables(generate(cfg, 2)))


def test_lengths_sum_exactly_and_respect_minimum():
    cfg = SyntheticConfig(n_interactions=10_001, mean_sequence_length=7.0)
    lengths = sequence_lengths(cfg, np.random.default_rng(0))
    assert lengths.sum() == 10_001
    assert lengths.min() >= 3


def test_popularity_is_heavy_tailed():
    frame = _frame(SyntheticConfig(n_interactions=50_000, n_items=1000))
    counts = frame[schema.ITEM].value_counts().to_numpy()
    top_share = counts[: len(counts) // 10].sum() / counts.sum()
    assert top_share > 0.3  # the top 10% of items take far more than 10% of interactions


def test_timestamps_increase_per_user_stay_in_span_and_noise_is_low_rated():
    cfg = SyntheticConfig(n_interactions=20_000, n_items=500, noise_rate=0.1, span_days=30, mean_sequence_length=100.0)
    frame = _frame(cfg)
    assert frame.groupby(schema.USER)[schema.TIMESTAMP].apply(lambda s: s.is_monotonic_increasing).all()
    start = pd.Timestamp(cfg.start_date, tz="UTC")
    assert frame[schema.TIMESTAMP].min() >= start
    assert frame[schema.TIMESTAMP].max() < start + pd.Timedelta(days=30)
    assert set(frame[schema.RATING].unique()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    low = (frame[schema.RATING] < 3).mean()
    assert 0.05 < low < 0.15


def test_next_item_depends_on_last_item():
    """Sequential structure: knowing the last item predicts the next far better than popularity."""
    cfg = SyntheticConfig(n_interactions=60_000, n_items=500, sequential_strength=0.6, noise_rate=0.0)
    frame = _frame(cfg).sort_values([schema.USER, schema.TIMESTAMP], kind="stable")
    frame["next"] = frame.groupby(schema.USER)[schema.ITEM].shift(-1)
    pairs = frame.dropna(subset=["next"])
    half = len(pairs) // 2
    fit, held = pairs.iloc[:half], pairs.iloc[half:]
    # Bigram "model": most frequent follower of each item, learnt on one half, scored on the other.
    top_follower = fit.groupby(schema.ITEM)["next"].agg(lambda s: set(s.value_counts().index[:3]))
    bigram_hits = np.mean([nxt in top_follower.get(cur, set()) for cur, nxt in zip(held[schema.ITEM], held["next"])])
    popular = set(fit["next"].value_counts().index[:3])
    popularity_hits = held["next"].isin(popular).mean()
    assert bigram_hits > 3 * popularity_hits


def test_users_have_concentrated_tastes():
    cfg = SyntheticConfig(n_interactions=30_000, n_items=600, n_topics=10, sequential_strength=0.0, noise_rate=0.0)
    catalogue = build_catalogue(cfg, np.random.default_rng(np.random.SeedSequence(7).spawn(3)[0]))
    position_of_item = np.empty(cfg.n_items + 1, dtype=np.int64)
    position_of_item[catalogue.item_ids] = np.arange(cfg.n_items)
    topic_of_position = np.searchsorted(catalogue.topic_end, np.arange(cfg.n_items), side="right")
    frame = _frame(cfg)
    frame["topic"] = topic_of_position[position_of_item[frame[schema.ITEM].to_numpy()]]
    top_topic_share = frame.groupby(schema.USER)["topic"].agg(lambda s: s.value_counts(normalize=True).iloc[0])
    # Without personal tastes every user would look like the global mix.
    global_top_share = frame["topic"].value_counts(normalize=True).iloc[0]
    assert top_topic_share.median() > 2 * global_top_share


def _rows_digest(cfg: SyntheticConfig, seed: int) -> str:
    """SHA-256 of every column in row order (timestamps as int64 microseconds)."""
    digest = hashlib.sha256()
    for table in generate(cfg, seed):
        for name in table.column_names:
            column = table.column(name).combine_chunks()
            if pa.types.is_string(column.type):
                digest.update("\n".join(column.to_pylist()).encode())
            else:
                kind = pa.int64() if pa.types.is_timestamp(column.type) else column.type
                digest.update(column.cast(kind).to_numpy(zero_copy_only=False).tobytes())
    return digest.hexdigest()[:16]


@pytest.mark.parametrize(("cfg", "seed", "expected"), [
    (SyntheticConfig(), 42, "16d0bdd824687742"),  # params.yaml's default: the committed dvc.lock's raw file
    (SyntheticConfig(n_interactions=20_000, n_items=300, chunk_users=100, mean_sequence_length=20), 7, "264260aa45bbcb98"),
    # 3M items cap a chunk at 89 users (the seen-bitmap limit); heavy noise and following.
    (SyntheticConfig(n_interactions=5_000, n_items=3_000_000, chunk_users=1000, mean_sequence_length=10,
                     noise_rate=0.3, sequential_strength=0.9), 3, "8dfc686d98793cf5"),
    # Long sequences in a short span: the time compression and the per-block time offsets.
    (SyntheticConfig(n_interactions=30_000, n_items=2000, mean_sequence_length=300, chunk_users=100, span_days=30),
     11, "7c58f1a342c139ba"),
], ids=["default", "many-chunks", "bitmap-cap", "long-sequences"])
def test_rows_identical_to_the_pre_vectorised_generator(cfg, seed, expected):
    """Digests computed from the generator as of commit 3428bed (rectangle per chunk, fresh bitmap):
    the faster one must yield the same users, items, timestamps, ratings in the same order."""
    assert _rows_digest(cfg, seed) == expected
