import functools

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.core.config import FeaturesConfig
from pipeline.core.errors import FeaturesError
from pipeline.core.io import Layout, write_parquet
from pipeline.data.features import apply_kcore
from pipeline.data.features_outofcore import run_features_on

T0 = pd.Timestamp("2024-01-01", tz="UTC")


@pytest.fixture
def run_features(engine):
    """Each features test runs on every engine (params `data_engine`, tests/data/conftest.py)."""
    return functools.partial(run_features_on, engine)


def _write(layout: Layout, rows: list[tuple]) -> None:
    """rows: (user, item, minutes after T0, rating)."""
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "minutes", "rating"])
    frame["timestamp"] = T0 + pd.to_timedelta(frame.pop("minutes"), unit="min")
    frame["rating"] = frame["rating"].astype("float32")
    frame["source"] = "test"
    write_parquet(frame[["user_id", "item_id", "timestamp", "rating", "source"]], layout.validated_interactions)


def _cfg(**overrides) -> FeaturesConfig:
    base = {"min_rating": None, "min_user_interactions": 1, "min_item_interactions": 1}
    return FeaturesConfig.model_validate({**base, **overrides})


def _sequences(layout: Layout) -> pd.DataFrame:
    return pd.read_parquet(layout.features_dir / "sequences.parquet")


def _vocab(layout: Layout, name: str) -> dict:
    frame = pd.read_parquet(layout.features_dir / f"{name}_vocab.parquet")
    return dict(zip(frame["id"], frame["index"]))


def test_leave_one_out_split_and_chronological_order(layout, run_features):
    # User 1's rows are given out of time order: sequences must be chronological.
    _write(layout, [(1, 10, 3, 5), (1, 11, 1, 5), (1, 12, 2, 5), (1, 13, 4, 5), (2, 10, 1, 5), (2, 11, 2, 5)])
    result = run_features(_cfg(), layout)
    items = _vocab(layout, "item")
    seq = _sequences(layout).set_index("user_idx")
    user1 = _vocab(layout, "user")[1]
    assert list(seq.loc[user1, "items"]) == [items[11], items[12], items[10], items[13]]
    assert (seq.loc[user1, ["n_train", "n_valid", "n_test"]].tolist()) == [2, 1, 1]
    # Fewer than 3 interactions: nothing to hold out, everything trains.
    assert seq.loc[_vocab(layout, "user")[2], ["n_train", "n_valid", "n_test"]].tolist() == [2, 0, 0]
    inter = pd.read_parquet(layout.features_dir / "interactions.parquet")
    last = inter[inter.user_idx == user1].sort_values("timestamp")
    assert last["split"].astype(str).tolist() == ["train", "train", "valid", "test"]
    assert result.stats["split"] == {"strategy": "leave_one_out", "train": 4, "valid": 1, "test": 1}


def test_padding_index_is_reserved(layout, run_features):
    _write(layout, [(u, i, u * 10 + i, 5) for u in range(1, 4) for i in range(1, 5)])
    run_features(_cfg(), layout)
    for name in ("user", "item"):
        indices = sorted(_vocab(layout, name).values())
        assert indices == list(range(1, len(indices) + 1))


def test_threshold_dedupe_and_accounting(layout, run_features):
    rows = [(1, 1, 1, 5), (1, 2, 2, 1), (1, 1, 3, 4), (1, 3, 4, 4), (1, 4, 5, 4), (1, 5, 6, 4)]
    _write(layout, rows)
    stats = run_features(_cfg(min_rating=3.0), layout).stats
    assert stats["rows"] == {
        "rows_in": 6, "dropped_below_min_rating": 1, "dropped_duplicate_pairs": 1, "dropped_kcore": 0, "rows_out": 4,
    }
    assert stats["min_rating_applied"] == 3.0
    inter = pd.read_parquet(layout.features_dir / "interactions.parquet")
    # keep="first": the earliest (user 1, item 1) survives.
    first_item = _vocab(layout, "item")[1]
    assert inter.loc[inter.item_idx == first_item, "timestamp"].iloc[0] == T0 + pd.Timedelta(minutes=1)


def test_dedupe_last_keeps_latest(layout, run_features):
    # User 2 gives the split its validation and test users.
    _write(layout, [(1, 1, 1, 5), (1, 2, 2, 5), (1, 1, 3, 5), *((2, i, 10 + i, 5) for i in range(1, 5))])
    run_features(_cfg(dedupe="last"), layout)
    seq = _sequences(layout)
    items = _vocab(layout, "item")
    assert list(seq["items"].iloc[0]) == [items[2], items[1]]


def test_kcore_is_iterative():
    # Item 2 has 1 interaction -> removed; then user 1 falls to 1 interaction -> removed; then
    # item 1 falls below 2 -> removed... only the dense block of users 2,3 x items 3,4 survives.
    users = np.array([1, 1, 2, 2, 3, 3, 1])
    items = np.array([1, 2, 3, 4, 3, 4, 5])
    keep, passes = apply_kcore(users, items, min_user=2, min_item=2, max_iterations=10)
    assert keep.tolist() == [False, False, True, True, True, True, False]
    assert passes >= 2


def test_kcore_not_converging_is_an_error():
    users = np.array([0, 0, 1, 1, 2])
    items = np.array([0, 1, 1, 2, 2])
    with pytest.raises(FeaturesError, match="did not converge"):
        apply_kcore(users, items, min_user=2, min_item=2, max_iterations=1)


def test_everything_filtered_is_a_clear_error(layout, run_features):
    _write(layout, [(1, 1, 1, 5), (2, 2, 2, 5)])
    with pytest.raises(FeaturesError, match="no interactions left"):
        run_features(_cfg(min_user_interactions=5), layout)


def test_temporal_split_uses_one_global_cutoff(layout, run_features):
    rows = [(u, i, u + 10 * i, 5) for u in range(1, 6) for i in range(1, 11)]
    _write(layout, rows)
    stats = run_features(_cfg(split={"strategy": "temporal", "valid_fraction": 0.2, "test_fraction": 0.2}), layout).stats
    inter = pd.read_parquet(layout.features_dir / "interactions.parquet")
    train_max = inter.loc[inter.split == "train", "timestamp"].max()
    valid = inter.loc[inter.split == "valid", "timestamp"]
    test_min = inter.loc[inter.split == "test", "timestamp"].min()
    assert train_max < valid.min() and valid.max() < test_min
    assert stats["split"]["train"] + stats["split"]["valid"] + stats["split"]["test"] == 50
    seq = _sequences(layout)
    assert (seq["n_train"] + seq["n_valid"] + seq["n_test"] == seq["items"].map(len)).all()


def test_vocabulary_is_stable_across_incremental_append(tmp_path, run_features):
    first, second = Layout(tmp_path / "day1"), Layout(tmp_path / "day2")
    day1 = [(u, i, u * 7 + i, 5) for u in (101, 102, 103) for i in (1, 2, 3, 4)]
    _write(first, day1)
    run_features(_cfg(), first)
    users_before, items_before = _vocab(first, "user"), _vocab(first, "item")

    # Day 2: old data plus new users (201, 202) and new items (8, 9), some IDs sorting before old ones.
    day2 = day1 + [(201, 8, 100, 5), (201, 1, 101, 5), (202, 9, 102, 5), (101, 9, 103, 5), (1, 8, 104, 5)]
    _write(second, day2)
    run_features(_cfg(vocab_from=str(first.features_dir)), second)
    users_after, items_after = _vocab(second, "user"), _vocab(second, "item")

    assert {k: users_after[k] for k in users_before} == users_before
    assert {k: items_after[k] for k in items_before} == items_before
    assert sorted(users_after[u] for u in (201, 202, 1)) == [4, 5, 6]
    assert sorted(items_after[i] for i in (8, 9)) == [5, 6]


def test_incremental_vocab_with_other_id_type_is_rejected(tmp_path, run_features):
    first, second = Layout(tmp_path / "a"), Layout(tmp_path / "b")
    _write(first, [(1, i, i, 5) for i in range(1, 5)])
    run_features(_cfg(), first)
    _write(second, [("u1", f"i{i}", i, 5) for i in range(1, 5)])
    with pytest.raises(FeaturesError, match="ID type"):
        run_features(_cfg(vocab_from=str(first.features_dir)), second)


def test_outputs_are_zstd_parquet_with_stats(layout, run_features):
    _write(layout, [(u, i, u + i, 5) for u in range(1, 5) for i in range(1, 6)])
    stats = run_features(_cfg(), layout).stats
    meta = pq.ParquetFile(layout.features_dir / "sequences.parquet").metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"
    assert stats["users"] == 4 and stats["items"] == 5 and stats["interactions"] == 20
    assert stats["density"] == pytest.approx(1.0)
    assert stats["sequence_length"]["p50"] == 5.0
    assert (layout.reports_dir / "features.json").exists()


def test_missing_input_is_a_clear_error(layout, run_features):
    with pytest.raises(FeaturesError, match="run the validate stage first"):
        run_features(_cfg(), layout)


def test_a_split_without_validation_or_test_users_is_refused_with_the_setting_to_change(layout, run_features):
    # Every user has two interactions: leave_one_out holds nothing out, so train would fail after its first epoch.
    _write(layout, [(u, i, u * 10 + i, 5) for u in range(1, 6) for i in (1, 2)])
    with pytest.raises(FeaturesError, match=r"no valid and no test users .*features\.min_user_interactions \(now 1\) to 3"):
        run_features(_cfg(), layout)
    assert not (layout.features_dir / "sequences.parquet").exists()
    # Temporal: the test cut-off leaves only user 9's rows, and user 9 has no history before them.
    _write(layout, [*((u, i, i, 5) for u in range(1, 6) for i in range(1, 5)), (9, 1, 100, 5), (9, 2, 101, 5)])
    temporal = {"strategy": "temporal", "valid_fraction": 0.05, "test_fraction": 0.05}
    with pytest.raises(FeaturesError, match=r"no test users .*features\.split\.valid_fraction"):
        run_features(_cfg(split=temporal), layout)


def test_a_file_without_a_rating_column_keeps_its_rows_with_the_default_threshold(tmp_path, run_features):
    """Implicit feedback (every row weight 1.0) passes the default features.min_rating=3.0; explicit ratings are still
    thresholded (test_threshold_dedupe_and_accounting)."""
    import shutil

    from pipeline.core.config import params_from_dict
    from pipeline.data.ingest import run_ingest

    source = tmp_path / "clicks.csv"
    lines = ["user_id,item_id,timestamp"] + [f"u{u},i{(u + k) % 12},{1_700_000_000 + 60 * (u * 20 + k)}"
                                             for u in range(30) for k in range(8)]
    source.write_text("\n".join(lines) + "\n")
    params = params_from_dict({}, ["ingest.source=file", f"ingest.file.path={source}"])
    assert params.features.min_rating == 3.0  # the default, unchanged for explicit ratings
    layout = Layout(tmp_path / "work")
    run_ingest(params.ingest, layout, seed=0)
    layout.validated_interactions.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(layout.raw_interactions, layout.validated_interactions)
    stats = run_features(params.features, layout).stats
    assert stats["rows"]["rows_in"] == 240 and stats["rows"]["dropped_below_min_rating"] == 0
    assert stats["interactions"] == 240 and stats["min_rating_applied"] is None
