import numpy as np
import pandas as pd
import pyarrow as pa

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
