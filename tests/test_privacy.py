"""With ingest.pseudonymise_users no raw user ID is in any artifact of a run: ingest (a file source, one row
quarantined) -> validate (with Data Docs) -> features -> train (MLflow on) -> register, every file of the
work dir searched (its bytes, and the decoded values of every Parquet file), MLflow's database and
artifacts included. The same run without pseudonymisation finds them, so the search can fail."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.core.config import params_from_dict
from pipeline.core.io import Layout
from pipeline.data.features import run_features
from pipeline.data.ingest import run_ingest
from pipeline.data.pseudonym import KEY_ENV, pseudonymise
from pipeline.data.sources import synthetic
from pipeline.data.validation import run_validate
from pipeline.training.train import run_train
from tests.helpers import TINY
from tests.registry_helpers import TRAIN, register_only

KEY = "a-test-key-that-lives-only-in-the-environment"
RAW_ID = re.compile(rb"alice-\d{4}")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """Tiny synthetic interactions as a CSV whose user IDs are easy to find (alice-0001...), plus a bad row."""
    import pyarrow as pa

    cfg = params_from_dict(TINY).ingest.synthetic
    table = pa.concat_tables(list(synthetic.generate(cfg, 0))).to_pandas()
    table["user_id"] = [f"alice-{u:04d}" for u in table["user_id"]]
    table["item_id"] = [f"item-{i}" for i in table["item_id"]]
    table["timestamp"] = table["timestamp"].astype("int64") // 10**6
    path = tmp_path_factory.mktemp("source") / "events.csv"
    lines = table[["user_id", "item_id", "timestamp"]].to_csv(index=False)
    path.write_text(lines + "alice-9999,item-1,not-a-time\n")
    return path


def _run(source: Path, root: Path, pseudonymise_users: bool) -> Layout:
    params = params_from_dict({
        "ingest": {"source": "file", "pseudonymise_users": pseudonymise_users, "file": {"path": str(source)}},
        "validate": {"min_rows": 100}, "features": TINY["features"], "train": TRAIN,
    })
    layout = Layout(root)
    run_ingest(params.ingest, layout, seed=0)
    run_validate(params.validate_, layout)
    run_features(params.features, layout)
    run_train(params.train, params.tracking, layout, seed=0)
    register_only(layout, params.tracking, "main")
    return layout


def _raw_ids_in(root: Path) -> dict[str, set[bytes]]:
    """Every file under root -> the raw user IDs found in its bytes or, for Parquet, in its decoded values."""
    found = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        hits = set(RAW_ID.findall(data))
        if path.suffix == ".parquet" and data[:4] == b"PAR1":  # compressed pages need decoding
            table = pq.read_table(path)
            hits |= set(RAW_ID.findall(str(table.to_pylist()).encode()))
        if hits:
            found[str(path.relative_to(root))] = hits
    return found


def test_no_raw_user_id_in_any_artifact_when_pseudonymised(source, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv(KEY_ENV, KEY)
    plain = tmp_path / "plain"
    plain.mkdir()
    monkeypatch.chdir(plain)
    _run(source, plain, pseudonymise_users=False)
    leaked = _raw_ids_in(plain)
    # The check sees raw IDs wherever an unprotected run keeps them: data, features, quarantine, MLflow.
    for where in ("data/raw", "data/validated", "data/features", "data/quarantine", "mlartifacts"):
        assert any(path.startswith(where) for path in leaked), (where, sorted(leaked))

    protected = tmp_path / "protected"
    protected.mkdir()
    monkeypatch.chdir(protected)
    layout = _run(source, protected, pseudonymise_users=True)
    assert _raw_ids_in(protected) == {}
    users = pq.read_table(layout.features_dir / "user_vocab.parquet").column("id").to_pylist()
    assert set(users) <= set(pseudonymise((f"alice-{u:04d}" for u in range(10_000)), KEY.encode()))
    files = [p for p in protected.rglob("*") if p.is_file()]
    assert len(files) > 20 and not any(KEY.encode() in p.read_bytes() for p in files)  # nor the key
