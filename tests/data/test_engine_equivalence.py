"""The SQL engines (params `data_engine: duckdb` and `spark`) write the same validate and features files as pandas."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.config import params_from_dict
from pipeline.core.io import Layout
from pipeline.data import sql_engine as sql_engines
from pipeline.data.features_outofcore import run_features_on
from pipeline.data.ingest import run_ingest
from pipeline.data.validation import run_validate
from tests.helpers import TINY

FEATURE_FILES = ("interactions.parquet", "sequences.parquet", "user_vocab.parquet", "item_vocab.parquet")


def _defects(table: pa.Table) -> pa.Table:
    """Duplicated rows, a null user, a rating out of range: every engine must route them alike."""
    rows = table.to_pylist()
    rows += rows[10:40]  # exact copies: duplicates
    rows[3]["user_id"] = None
    rows[7]["rating"] = 9.0
    rows[50]["rating"] = float("nan")
    return pa.Table.from_pylist(rows, schema=table.schema)


def _run(root, engine: str, features: dict, defects: bool) -> Layout:
    params = params_from_dict({**TINY, "data_engine": engine, "features": {**TINY["features"], **features},
                               "validate": {"min_rows": 100, "data_docs": False}})
    layout = Layout(root / engine)
    run_ingest(params.ingest, layout, seed=params.seed)
    if defects:
        pq.write_table(_defects(pq.read_table(layout.raw_interactions)), layout.raw_interactions)
    run_validate(params.validate_, layout, engine=engine)
    run_features_on(engine, params.features, layout)
    return layout


def _stats(layout: Layout) -> dict:
    # Cached by DVC, so neither the wall time nor the engine is in it: both engines write the same file.
    return json.loads((layout.features_dir / "stats.json").read_text())


@pytest.mark.parametrize("features", [
    {},
    {"dedupe": "last", "min_rating": None},
    {"dedupe": "none", "split": {"strategy": "temporal"}},
    {"min_user_interactions": 8, "min_item_interactions": 20},  # several k-core passes
], ids=["defaults", "dedupe_last", "temporal", "deep_kcore"])
def test_sql_engines_write_the_same_files_as_pandas(tmp_path, features, sql_engine):
    pandas_run, sql_run = (_run(tmp_path, engine, features, defects=True) for engine in ("pandas", sql_engine))
    for name in FEATURE_FILES:
        expected, got = pq.read_table(pandas_run.features_dir / name), pq.read_table(sql_run.features_dir / name)
        assert got.schema == expected.schema, name
        assert got.equals(expected), name
    assert _stats(sql_run) == _stats(pandas_run)
    for path in ("validated_interactions",):
        assert pq.read_table(getattr(sql_run, path)).equals(pq.read_table(getattr(pandas_run, path)))
    quarantine = [pq.read_table(run.quarantine_dir / "validate.parquet").to_pandas() for run in (pandas_run, sql_run)]
    assert quarantine[1].equals(quarantine[0])
    assert set(quarantine[0]["reason"]) == {"duplicate", "null_user_id", "rating_out_of_range", "null_rating"}
    assert (quarantine[0]["reason"] == "duplicate").sum() >= 30


def test_string_ids_and_an_extended_vocabulary_match(tmp_path, sql_engine):
    """String IDs order as pandas orders them; vocab_from extends the earlier vocabulary alike."""
    runs = {}
    for engine in ("pandas", sql_engine):
        first = _run(tmp_path / "first", engine, {}, defects=False)
        later = Layout(tmp_path / "later" / engine)
        raw = pq.read_table(first.raw_interactions)
        as_text = raw.set_column(0, "user_id", raw.column("user_id").cast(pa.string()))
        as_text = as_text.set_column(1, "item_id", raw.column("item_id").cast(pa.string()))
        for layout in (first, later):
            layout.validated_interactions.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(as_text.slice(0, 4000), first.validated_interactions)
        pq.write_table(as_text, later.validated_interactions)
        cfg = params_from_dict(TINY).features
        run_features_on(engine, cfg, first)
        run_features_on(engine, cfg.model_copy(update={"vocab_from": str(first.features_dir)}), later)
        runs[engine] = later
        shutil.rmtree(first.features_dir.parent / "validated")
    for name in FEATURE_FILES:
        assert pq.read_table(runs[sql_engine].features_dir / name).equals(pq.read_table(runs["pandas"].features_dir / name)), name


def test_batches_smaller_than_the_input_change_no_output(tmp_path, sql_engine, monkeypatch):
    """Both stages stream rows in batches of sql_engine.BATCH_ROWS; a user's rows straddle batches here."""
    expected = _run(tmp_path, "pandas", {}, defects=True)
    monkeypatch.setattr(sql_engines, "BATCH_ROWS", 997)
    got = _run(tmp_path, sql_engine, {}, defects=True)
    for name in FEATURE_FILES:
        assert pq.read_table(got.features_dir / name).equals(pq.read_table(expected.features_dir / name)), name
    assert pq.read_table(got.validated_interactions).equals(pq.read_table(expected.validated_interactions))
    quarantine = [pq.read_table(run.quarantine_dir / "validate.parquet").to_pandas() for run in (expected, got)]
    assert quarantine[1].equals(quarantine[0]) and len(quarantine[0]) >= 30
