"""Incremental building blocks: new rows by key, merge with the reference (pipeline/data/incremental.py)."""

import json
import shutil

import pandas as pd
import pyarrow as pa
import pytest

from pipeline.core.errors import IngestError
from pipeline.core.io import Layout, write_parquet
from pipeline.data.incremental import merge_with_reference, select_new


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


def test_incremental_flow_grows_the_vocabularies_and_warm_starts(tmp_path, monkeypatch):
    """The building blocks in the order the incremental DAG will run them, through pipeline.orchestration.runs."""
    import torch
    from safetensors.torch import load_file

    from pipeline.orchestration import runs
    from pipeline.training.warmstart import TABLE_KEY
    from tests.dags.test_dags import ROOT
    from tests.helpers import TINY_FORM

    monkeypatch.setenv("LEANREC_RUNS_DIR", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    fast = ["tracking.enabled=false", "train.epochs=1", "train.baselines=[]", "train.max_len=20"]
    first = runs.prepare_run("first", {**TINY_FORM, "overrides": [*TINY_FORM["overrides"], *fast]}, ROOT / "params.yaml")
    for stage in ("ingest", "validate", "features", "train"):
        runs.run_stage(stage, first)
    reference = first / "data" / "validated" / "interactions.parquet"

    def incremental(name: str, seed: int, items: int) -> tuple[Layout, bool]:
        form = {**TINY_FORM, "synthetic_items": items, "overrides": [
            *TINY_FORM["overrides"], *fast, f"seed={seed}", "train.lr=1.0e-12", "drift.action=warn"]}
        # The paths come as the incremental DAG passes its champion lineage (the form may not set paths).
        lineage = [f"features.vocab_from={first / 'data' / 'features'}", f"train.init_from={first / 'models' / 'main'}",
                   f"drift.reference={reference}"]
        root = runs.prepare_run(name, form, ROOT / "params.yaml", base_overrides=lineage)
        layout = Layout(root)
        runs.run_stage("ingest", root)
        if select_new(layout, reference).empty:
            return layout, False
        runs.run_stage("validate", root)
        runs.run_stage("drift", root)
        merge_with_reference(layout, reference)
        runs.run_stage("features", root)
        runs.run_stage("train", root)
        return layout, True

    second, ran = incremental("second", seed=7, items=200)
    assert ran
    old_vocab = pd.read_parquet(first / "data" / "features" / "item_vocab.parquet")
    new_vocab = pd.read_parquet(second.features_dir / "item_vocab.parquet")
    assert len(new_vocab) > len(old_vocab) and new_vocab.head(len(old_vocab)).equals(old_vocab)
    old_users = pd.read_parquet(first / "data" / "features" / "user_vocab.parquet")
    assert len(pd.read_parquet(second.features_dir / "user_vocab.parquet")) >= len(old_users)
    assert json.loads((second.reports_dir / "drift.json").read_text())["counts"]["new_items"] > 0
    old_table = load_file(str(first / "models" / "main" / "model.safetensors"))[TABLE_KEY]
    new_table = load_file(str(second.model_dir("main") / "model.safetensors"))[TABLE_KEY]
    assert new_table.shape[0] == len(new_vocab) + 1
    torch.testing.assert_close(new_table[: old_table.shape[0]], old_table, atol=1e-6, rtol=0)

    # The same source as the reference again: nothing new, nothing to do.
    _, ran = incremental("third", seed=42, items=TINY_FORM["synthetic_items"])
    assert not ran
