"""Incremental building blocks: new rows by key, merge with the reference (pipeline/incremental.py)."""

import json
import shutil

import pandas as pd
import pyarrow as pa
import pytest

from pipeline.errors import IngestError
from pipeline.incremental import merge_with_reference, select_new
from pipeline.io import Layout, write_parquet


def _rows(*keys, source="synthetic") -> pd.DataFrame:
    return pd.DataFrame({
        "user_id": pd.array([k[0] for k in keys], dtype="int64"),
        "item_id": pd.array([k[1] for k in keys], dtype="int64"),
        "timestamp": pd.to_datetime([k[2] for k in keys], unit="s", utc=True).astype("datetime64[us, UTC]"),
        "rating": pd.array([4.0] * len(keys), dtype="float32"),
        "source": [source] * len(keys),
    })


@pytest.fixture
def setup(tmp_path):
    layout = Layout(tmp_path / "run")
    reference = tmp_path / "reference.parquet"
    write_parquet(_rows((1, 10, 100), (1, 11, 200), (2, 10, 150)), reference)
    # The source re-delivers known rows, a late event with an old timestamp, and new users/items.
    write_parquet(_rows((1, 10, 100), (2, 10, 150), (2, 12, 50), (3, 13, 300), (1, 11, 200)), layout.raw_interactions)
    return layout, reference


def test_select_new_keeps_unseen_keys_including_late_events(setup):
    layout, reference = setup
    result = select_new(layout, reference)
    assert (result.rows_in, result.rows_new, result.rows_known, result.empty) == (5, 2, 3, False)
    raw = pd.read_parquet(layout.raw_interactions)
    assert list(zip(raw.user_id, raw.item_id)) == [(2, 12), (3, 13)]
    assert json.loads((layout.reports_dir / "incremental.json").read_text())["rows_new"] == 2
    again = select_new(layout, reference)  # idempotent
    assert (again.rows_in, again.rows_new) == (2, 2)


def test_no_new_rows_is_an_empty_result(setup, tmp_path):
    layout, reference = setup
    shutil.copy(reference, layout.raw_interactions)
    result = select_new(layout, reference)
    assert result.empty and result.rows_known == 3
    assert pd.read_parquet(layout.raw_interactions).empty


def test_merge_adds_the_new_rows_once(setup):
    layout, reference = setup
    select_new(layout, reference)
    layout.validated_interactions.parent.mkdir(parents=True)
    shutil.copy(layout.raw_interactions, layout.validated_interactions)
    assert merge_with_reference(layout, reference) == 5
    assert merge_with_reference(layout, reference) == 5  # idempotent: the reference rows are not added twice
    merged = pd.read_parquet(layout.validated_interactions)
    assert sorted(zip(merged.user_id, merged.item_id)) == [(1, 10), (1, 11), (2, 10), (2, 12), (3, 13)]
    assert merged.dtypes.to_dict() == _rows((1, 1, 1)).dtypes.to_dict()


def test_id_types_must_match(setup):
    layout, reference = setup
    frame = _rows((1, 10, 100))
    write_parquet(pa.Table.from_pandas(frame.astype({"user_id": str, "item_id": str}), preserve_index=False),
                  layout.raw_interactions)
    with pytest.raises(IngestError, match="must keep the source's ID type"):
        select_new(layout, reference)
    with pytest.raises(IngestError, match="not found"):
        select_new(layout, reference.with_name("missing.parquet"))
