"""User pseudonymisation: the keyed hash, where its key may come from, and ingest applying it."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.core import schema
from pipeline.core.config import params_from_dict
from pipeline.core.io import Layout
from pipeline.data.ingest import run_ingest
from pipeline.data.pseudonym import (
    KEY_ENV,
    KEY_FILE_ENV,
    PROJECT_ROOT,
    PseudonymKeyError,
    is_pseudonym,
    key_check,
    load_key,
    pseudonymise,
)
from tests.helpers import TINY

KEY = b"0123456789abcdef-test-key"


def test_pseudonyms_are_truncated_hmac_sha256_deterministic_and_keyed():
    first = pseudonymise(["alice", 42, "bob"], KEY)
    assert first == pseudonymise(["alice", 42, "bob"], KEY)
    assert first[0] == "pu-" + hmac.new(KEY, b"alice", hashlib.sha256).hexdigest()[:32]
    assert first[1] == pseudonymise(["42"], KEY)[0]  # an integer ID and its string give the same pseudonym
    assert len(set(first)) == 3 and all(is_pseudonym(p) for p in first)
    assert pseudonymise(["alice"], KEY + b"x") != first[:1]
    assert not is_pseudonym("alice") and not is_pseudonym("0" * 32)
    assert key_check(KEY) != key_check(KEY + b"x") and KEY.hex() not in key_check(KEY)


def test_key_comes_from_the_environment_or_a_file_outside_the_project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_key({}, required=False) is None
    with pytest.raises(PseudonymKeyError, match=KEY_ENV):
        load_key({})
    assert load_key({KEY_ENV: KEY.decode()}) == KEY
    with pytest.raises(PseudonymKeyError, match="shorter"):
        load_key({KEY_ENV: "short"})
    outside = tmp_path.parent / f"{tmp_path.name}-key"
    outside.write_bytes(KEY + b"\n")
    assert load_key({KEY_FILE_ENV: str(outside)}) == KEY
    with pytest.raises(PseudonymKeyError, match="not both"):
        load_key({KEY_ENV: KEY.decode(), KEY_FILE_ENV: str(outside)})
    for inside in (PROJECT_ROOT / "params.yaml", tmp_path / "key"):  # the project, the work directory
        with pytest.raises(PseudonymKeyError, match="outside") as err:
            load_key({KEY_FILE_ENV: str(inside)})
        assert KEY.decode() not in str(err.value)


def test_synthetic_ingest_pseudonymises_user_ids(tmp_path, monkeypatch):
    plain = params_from_dict(TINY)
    run_ingest(plain.ingest, Layout(tmp_path / "plain"), seed=0)
    monkeypatch.setenv(KEY_ENV, KEY.decode())
    params = params_from_dict({**TINY, "ingest": {**TINY["ingest"], "pseudonymise_users": True}})
    run_ingest(params.ingest, Layout(tmp_path / "pseud"), seed=0)
    raw = pq.read_table(Layout(tmp_path / "plain").raw_interactions).to_pandas()
    hashed = pq.read_table(Layout(tmp_path / "pseud").raw_interactions).to_pandas()
    assert hashed[schema.USER].tolist() == pseudonymise(raw[schema.USER].tolist(), KEY)
    pd.testing.assert_frame_equal(hashed.drop(columns=schema.USER), raw.drop(columns=schema.USER))


def test_file_ingest_pseudonymises_users_and_redacts_quarantined_lines(tmp_path, monkeypatch):
    source = tmp_path / "events.csv"
    source.write_text("user_id,item_id,timestamp\nalice-0001,i1,1700000000\nbob-0002,i2,1700000100\n"
                      "carol-0003,i3,not-a-time\n")
    params = params_from_dict({"ingest": {"source": "file", "pseudonymise_users": True, "file": {"path": str(source)}}})
    with pytest.raises(PseudonymKeyError):
        run_ingest(params.ingest, Layout(tmp_path / "nokey"), seed=0)
    monkeypatch.setenv(KEY_ENV, KEY.decode())
    layout = Layout(tmp_path / "work")
    result = run_ingest(params.ingest, layout, seed=0)
    users = pq.read_table(layout.raw_interactions).column(schema.USER).to_pylist()
    assert users == pseudonymise(["alice-0001", "bob-0002"], KEY)
    quarantine = pd.read_parquet(result.quarantine_path)
    assert len(quarantine) == 1 and quarantine["raw"].iloc[0].startswith("redacted:")
    for path in (layout.raw_interactions, result.quarantine_path, result.report_path):
        data = Path(path).read_bytes()
        assert b"carol-0003" not in data and b"alice-0001" not in data
