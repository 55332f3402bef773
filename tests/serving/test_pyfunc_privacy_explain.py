"""The served model with pseudonymised users (raw IDs in, hashed with the server's key) and `explain`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from mlflow.exceptions import MlflowException

import mlflow
from pipeline.core.config import PolicyConfig, RegistryConfig, TrackingConfig
from pipeline.data.pseudonym import KEY_ENV, PseudonymKeyError, is_pseudonym, pseudonymise
from pipeline.data.sequences import load_sequences
from pipeline.models.explain import explain
from pipeline.models.recommender import Recommender
from pipeline.orchestration.cli import main
from pipeline.registry.promote import promote
from pipeline.registry.register import register
from pipeline.serving.pyfunc import log_servable
from tests.helpers import TINY
from tests.registry.test_registry import _free_port, _stop, _wait_for, start_server
from tests.registry_helpers import build_trained, compress
from tests.serving.test_pyfunc import _post

KEY = "pyfunc-test-key-0123456789"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny model trained on pseudonymised synthetic users, logged as a pyfunc with the key set."""
    root = tmp_path_factory.mktemp("private")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(KEY_ENV, KEY)
        layout = build_trained(root, {"ingest": {**TINY["ingest"], "pseudonymise_users": True}})
        mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
        experiment = mlflow.create_experiment("private", artifact_location=(root / "mlartifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            info = log_servable(layout.model_dir("main"), layout.features_dir, name="teacher")
        model = mlflow.pyfunc.load_model(info.model_uri)
    data = load_sequences(layout.features_dir)
    users = pq.read_table(layout.features_dir / "user_vocab.parquet").to_pandas()
    items = pq.read_table(layout.features_dir / "item_vocab.parquet").to_pandas()
    assert all(is_pseudonym(u) for u in users["id"])
    # The synthetic raw IDs are 0..n: the raw ID of each known user is the one whose pseudonym it holds.
    raw_of = dict(zip(pseudonymise(range(10_000), KEY.encode()), range(10_000), strict=True))
    return {"root": root, "layout": layout, "model": model, "info": info, "data": data,
            "raw_user": {int(i): raw_of[u] for i, u in zip(users["index"], users["id"], strict=True)},
            "item_id": dict(zip(items["index"], items["id"], strict=True))}


def _history(served, row: int) -> list[int]:
    data = served["data"]
    return data.items[data.offsets[row] : data.offsets[row + 1]].tolist()


def test_raw_user_ids_are_pseudonymised_with_the_servers_key_and_explained(served):
    data, rec = served["data"], Recommender.load(served["layout"].model_dir("main"))
    raw = [served["raw_user"][int(data.users[r])] for r in (0, 1)]
    response = served["model"].predict(pd.DataFrame({"user_id": raw, "k": [4, 2], "explain": [True, False]}))
    assert list(response.columns) == ["user_id", "items", "scores", "source", "unknown_items", "because", "because_weights"]
    first, second = response.iloc[0], response.iloc[1]
    assert first["source"] == "model" and first["user_id"] == str(raw[0])  # the raw ID back, never the pseudonym
    expected, _ = rec.recommend([_history(served, 0)], k=4)
    assert list(first["items"]) == [served["item_id"][i] for i in expected[0].tolist()]
    because = explain(rec, [_history(served, 0)], expected.tolist())[0]
    assert [list(ids) for ids in first["because"]] == [[served["item_id"][i] for i, _ in s] for s in because]
    for got, want in zip(first["because_weights"], because, strict=True):
        np.testing.assert_allclose(got, [w for _, w in want], rtol=1e-4, atol=1e-5)
    assert second["because"] is None and second["because_weights"] is None  # explain: false costs nothing
    assert "because" not in served["model"].predict(pd.DataFrame({"user_id": raw[:1]})).columns
    history = [served["item_id"][i] for i in _history(served, 2)]
    (row,) = served["model"].predict(pd.DataFrame({"history": [history], "explain": [True]})).to_dict("records")
    assert len(row["because"]) == 10 and {i for ids in row["because"] for i in ids} <= set(history)
    diverse = served["model"].predict(pd.DataFrame({"user_id": raw[:1], "k": [3], "diversity": [0.5],
                                                    "explain": [True]})).iloc[0]
    assert len(diverse["because"]) == 3  # the re-ranked items are the ones explained
    diverse_items = [next(k for k, v in served["item_id"].items() if v == i) for i in diverse["items"]]
    assert [list(ids) for ids in diverse["because"]] == [
        [served["item_id"][i] for i, _ in s] for s in explain(rec, [_history(served, 0)], [diverse_items])[0]]
    unknown = served["model"].predict(pd.DataFrame({"history": [[10**12]], "explain": [True]})).iloc[0]
    assert unknown["source"] == "popularity" and list(unknown["because"]) == []  # the fallback has no model reasons


@pytest.mark.parametrize("value", ["yes", 2, 1.5, [True]])
def test_a_bad_explain_value_is_a_bad_request(served, value):
    raw = served["raw_user"][int(served["data"].users[0])]
    with pytest.raises(MlflowException, match="explain") as err:
        served["model"].predict(pd.DataFrame({"user_id": [raw], "explain": [value]}))
    assert err.value.error_code == "INVALID_PARAMETER_VALUE"


def test_the_model_refuses_to_load_without_the_key_or_with_another(served, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(PseudonymKeyError, match="pseudonymised"):
        mlflow.pyfunc.load_model(served["info"].model_uri)
    monkeypatch.setenv(KEY_ENV, KEY + "-other")
    with pytest.raises(PseudonymKeyError, match="not the one"):
        mlflow.pyfunc.load_model(served["info"].model_uri)


def test_cli_explains_one_user_of_the_champion(served, monkeypatch, capsys, caplog):
    import json

    layout = served["layout"]
    tracking = TrackingConfig(tracking_uri=f"sqlite:///{served['root']}/registry.db")
    monkeypatch.setenv(KEY_ENV, KEY)
    compress(layout, ())
    cfg = RegistryConfig(policy=PolicyConfig(max_latency_p50_ms=None, min_latency_speedup=None))
    register(cfg, tracking, layout)
    assert promote(cfg, tracking, layout)["decision"] == "promoted"
    raw = served["raw_user"][int(served["data"].users[5])]
    argv = ["explain", "--workdir", str(layout.root), "-S", f"tracking.tracking_uri={tracking.tracking_uri}",
            "-S", "registry.policy.max_latency_p50_ms=null", "--user-id", str(raw), "--k", "3"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    rec = Recommender.load(layout.model_dir("main"))
    expected, _ = rec.recommend([_history(served, 5)], k=3)
    assert out["user_id"] == str(raw) and out["source"] == "model"
    assert [r["item_id"] for r in out["recommendations"]] == [served["item_id"][i] for i in expected[0].tolist()]
    because = explain(rec, [_history(served, 5)], expected.tolist())[0]
    assert [[b["item_id"] for b in r["because"]] for r in out["recommendations"]] == [
        [served["item_id"][i] for i, _ in s] for s in because]
    assert main(["explain", "--workdir", str(layout.root), "-S", f"tracking.tracking_uri={tracking.tracking_uri}",
                 "--user-id", "nobody"]) == 2
    assert "is not among the champion's" in caplog.text
    assert main(["recommend", "--workdir", str(layout.root), "--user-id", "1"]) == 2


@pytest.mark.slow
def test_http_explain_and_bad_values_answered_400(served, tmp_path):
    port = _free_port()
    env = {**os.environ, KEY_ENV: KEY, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = start_server(["mlflow", "models", "serve", "-m", served["info"].model_uri, "--env-manager", "local",
                         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], tmp_path, env)
    try:
        _wait_for(f"http://127.0.0.1:{port}/ping", proc)
        url = f"http://127.0.0.1:{port}/invocations"
        raw = served["raw_user"][int(served["data"].users[0])]
        status, body = _post(url, {"dataframe_records": [{"user_id": raw, "k": 3, "explain": True}]})
        assert status == 200, body
        (row,) = body["predictions"]
        assert row["source"] == "model" and len(row["because"]) == 3 and len(row["because_weights"]) == 3
        history = {served["item_id"][i] for i in _history(served, 0)}
        assert row["because"][0] and set(row["because"][0]) <= history
        assert all(w > 0 for weights in row["because_weights"] for w in weights)
        for value in ("yes", 3, [1]):
            status, body = _post(url, {"dataframe_records": [{"user_id": raw, "explain": value}]})
            assert status == 400 and "explain" in body["message"], (value, status, body)
    finally:
        _stop(proc)
