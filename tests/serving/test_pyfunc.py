"""The servable pyfunc: known users, raw histories, unknown users and items, bad requests; HTTP serving (slow)."""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from pipeline.core.config import PolicyConfig, RegistryConfig, TrackingConfig
from pipeline.models.recommender import Recommender
from pipeline.models.variants import save_variant
from pipeline.registry.promote import promote
from pipeline.registry.register import register
from pipeline.serving.request import MAX_HISTORY, parse_request
from tests.registry.test_registry import _free_port, _stop, _wait_for, start_server
from tests.registry_helpers import compress, measure, write_compression
from tests.serving.helpers import full_history as _full_history


def test_known_users_get_the_models_top_k_of_their_whole_history(served):
    data = served["data"]
    rows = [0, 1, 2]
    request = pd.DataFrame({"user_id": [int(served["user_id"][data.users[r]]) for r in rows], "k": [5, 10, 3]})
    response = served["teacher"].predict(request)
    assert list(response.columns) == ["user_id", "items", "scores", "source", "unknown_items"]
    rec = Recommender.load(served["layout"].model_dir("main"))
    for position, row in enumerate(rows):
        history = _full_history(served, row)
        k = int(request["k"][position])
        expected, expected_scores = rec.recommend([history], k=k)
        got = response.iloc[position]
        assert got["source"] == "model" and got["unknown_items"] == 0
        assert list(got["items"]) == [int(served["item_id"][i]) for i in expected[0].tolist()]
        np.testing.assert_allclose(got["scores"], expected_scores[0].numpy(), rtol=1e-5)
        assert not {served["item_index"][i] for i in got["items"]} & set(history)  # nothing already seen


def test_a_raw_history_ignores_and_counts_unknown_items(served):
    history = [int(served["item_id"][i]) for i in _full_history(served, 4)[:6]]
    unknown = [10**12, 10**12 + 1]
    response = served["teacher"].predict(pd.DataFrame({"history": [history, unknown[:1] + history + unknown[1:]]}))
    clean, noisy = response.iloc[0], response.iloc[1]
    assert clean["unknown_items"] == 0 and noisy["unknown_items"] == 2
    assert list(noisy["items"]) == list(clean["items"]) and len(clean["items"]) == 10
    assert not set(clean["items"]) & set(history)
    assert clean["user_id"] is None


def test_one_request_mixes_known_users_and_histories(served):
    known = int(served["user_id"][served["data"].users[0]])
    history = [int(served["item_id"][i]) for i in _full_history(served, 1)[:3]]
    mixed = served["teacher"].predict(pd.DataFrame({"user_id": [known, None], "history": [None, history], "k": [2, None]}))
    alone = served["teacher"].predict(pd.DataFrame({"user_id": [known], "k": [2]})).iloc[0]
    assert list(mixed.iloc[0]["items"]) == list(alone["items"]) and len(mixed.iloc[1]["items"]) == 10
    assert mixed.iloc[0]["user_id"] == str(known) and mixed.iloc[1]["user_id"] is None


def test_unknown_users_and_all_unknown_histories_fall_back_to_popularity(served):
    response = served["teacher"].predict(pd.DataFrame({"user_id": [-5], "k": [4]}))
    data = served["data"]
    counts = np.bincount(data.items, minlength=data.n_items + 1)
    counts[0] = -1
    top = np.argsort(-counts, kind="stable")[:4]
    got = response.iloc[0]
    assert got["source"] == "popularity"
    assert list(got["items"]) == [int(served["item_id"][i]) for i in top]
    assert list(got["scores"]) == [float(c) for c in counts[top]]
    only_unknown = served["teacher"].predict(pd.DataFrame({"history": [[10**12, 10**12 + 7]]})).iloc[0]
    assert only_unknown["source"] == "popularity" and only_unknown["unknown_items"] == 2


def test_any_variant_is_servable(served):
    request = pd.DataFrame({"user_id": [int(served["user_id"][served["data"].users[0]])]})
    response = served["variant"].predict(request).iloc[0]
    expected, _ = Recommender.load(served["variant_dir"]).recommend([_full_history(served, 0)], k=10)
    assert list(response["items"]) == [int(served["item_id"][i]) for i in expected[0].tolist()]


def test_signature_and_input_example_are_logged(served):
    info = served["teacher_info"]
    # No input schema: MLflow would drop the columns it does not name before predict sees them.
    assert info.signature.inputs is None
    assert {c.name for c in info.signature.outputs.inputs} == {"user_id", "items", "scores", "source", "unknown_items",
                                                               "because", "because_weights"}
    assert info.saved_input_example_info is not None


@pytest.mark.parametrize(
    ("request_frame", "message"),
    [
        (pd.DataFrame({"k": [3]}), "needs a user_id column"),
        (pd.DataFrame({"user_id": ["not-a-number"]}), "user IDs are integers"),
        (pd.DataFrame({"user_id": [True]}), "user_id must be an integer or a string"),
        (pd.DataFrame({"history": [["a", "b"]]}), "row 0: history: item IDs are integers, got 'a'"),
        (pd.DataFrame({"history": ["1,2"]}), "history must be a list of item IDs"),
        (pd.DataFrame({"history": [[1, 2]], "k": [0]}), "k must be between 1 and"),
        (pd.DataFrame({"history": [[1, 2]], "k": [10**9]}), "k must be between 1 and"),
        (pd.DataFrame({"history": [[1, 2]], "k": [2.5]}), "k must be an integer"),
        (pd.DataFrame({"history": [[1, 2]], "k": ["5"]}), "k must be an integer"),
        (pd.DataFrame({"user_id": [1, None], "history": [[1], None]}), "row 0: give a user_id or a history, not both"),
        (pd.DataFrame({"user_id": [None], "history": [None]}), "give a user_id or a history"),
        (pd.DataFrame({"user_id": pd.Series([], dtype="int64")}), "no rows"),
        (pd.DataFrame({"history": [[1, 2]], "K": [3]}), r"unknown column\(s\) \['K'\]"),
        (pd.DataFrame({"user_id": [1], "user": [2], "kk": [3]}), r"unknown column\(s\) \['user', 'kk'\]"),
        (pd.DataFrame({"history": [[1] * (MAX_HISTORY + 1)]}), f"row 0: history holds {MAX_HISTORY + 1} items; at most"),
        (pd.DataFrame({"history": [[1], 7]}), "row 1: history must be a list of item IDs, got int"),
        (pd.DataFrame({"history": [[1, True]]}), r"item IDs are integers, got True \(bool\)"),
    ],
)
def test_bad_requests_raise_invalid_parameter_value(served, request_frame, message):
    with pytest.raises(MlflowException, match=message) as err:
        served["teacher"].predict(request_frame)
    assert err.value.error_code == "INVALID_PARAMETER_VALUE"
    assert err.value.get_http_status_code() == 400


@pytest.mark.parametrize("column", ["user_id", "history", "k", "K"])
def test_an_error_quotes_at_most_a_short_repr_of_the_offending_value(served, column):
    """A 20 MB value (an ID, an item, a k, a column name) comes back as a message of a few hundred characters."""
    huge = "u" * 20_000_000
    frame = pd.DataFrame({
        "user_id": {"user_id": [huge]}, "history": {"history": [[huge]]}, "k": {"history": [[1]], "k": [huge]},
        "K": {"history": [[1]], huge: [1]},
    }[column])
    with pytest.raises(MlflowException) as err:
        served["teacher"].predict(frame)
    assert err.value.get_http_status_code() == 400
    assert len(err.value.message) < 400 and "uuuu" in err.value.message, err.value.message[:400]


def test_a_history_at_the_cap_is_scored_on_its_most_recent_items(served):
    """MAX_HISTORY items are accepted; the answer is the model's for the last max_len of them."""
    history = [int(served["item_id"][i]) for i in _full_history(served, 2)]
    long = (history * (MAX_HISTORY // len(history) + 1))[-MAX_HISTORY:]
    got = served["teacher"].predict(pd.DataFrame({"history": [long], "k": [5]})).iloc[0]
    rec = Recommender.load(served["layout"].model_dir("main"))
    expected, _ = rec.recommend([[served["item_index"][i] for i in long]], k=5)
    assert list(got["items"]) == [int(served["item_id"][i]) for i in expected[0].tolist()]


def test_a_request_holds_at_most_max_request_items(served, monkeypatch):
    from pipeline.serving import request

    monkeypatch.setattr(request, "MAX_REQUEST_ITEMS", 10)
    servable = served["teacher"].unwrap_python_model().servable
    assert len(parse_request(pd.DataFrame({"history": [[1] * 5, [2] * 5]}), servable)) == 2
    with pytest.raises(MlflowException, match="row 2: the request's histories hold more than 10 items"):
        parse_request(pd.DataFrame({"history": [[1] * 5, [2] * 5, [3]]}), servable)


def test_records_and_column_dicts_are_accepted_in_process(served):
    servable = served["teacher"].unwrap_python_model().servable
    records = parse_request([{"history": [1, 2], "k": 3}, {"user_id": 5}], servable)
    columns = parse_request({"history": [[1, 2]], "k": [3]}, servable)
    assert records[0] == columns[0] == {"user_id": None, "history": [1, 2], "k": 3, "diversity": 0.0, "explain": False}
    assert records[1] == {"user_id": 5, "history": None, "k": 10, "diversity": 0.0, "explain": False}
    with pytest.raises(MlflowException, match="the request is not a table"):
        parse_request({"user_id": 5}, servable)


# ----------------------------------------------------------------------------- HTTP


def _post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.slow
def test_mlflow_models_serve_answers_invocations_for_the_champion(served, tmp_path):
    """The champion here is an item-code (pq) variant: registered, promoted and served over HTTP like any model."""
    from pipeline.models.coded import code_teacher
    from pipeline.models.sasrec import load_model

    layout = served["layout"]
    teacher_dir = layout.model_dir("main")
    pq_dir = save_variant(code_teacher(load_model(teacher_dir), 4, 16, seed=0), teacher_dir / "variants" / "pq", "pq")
    models = compress(layout, ())
    models["pq"] = measure(layout, pq_dir, "pq")
    write_compression(layout, models)
    tracking = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    cfg = RegistryConfig(policy=PolicyConfig(candidates=["pq"], max_latency_p50_ms=None, min_latency_speedup=None))
    assert register(cfg, tracking, layout)["candidate"] == "pq"
    assert promote(cfg, tracking, layout)["decision"] == "promoted"
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = start_server(["mlflow", "models", "serve", "-m", "models:/leanrec@champion", "--env-manager", "local",
                         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], tmp_path, env)
    try:
        _wait_for(f"http://127.0.0.1:{port}/ping", proc)
        url = f"http://127.0.0.1:{port}/invocations"
        known = int(served["user_id"][served["data"].users[0]])  # row 0 of the features
        history = [int(served["item_id"][i]) for i in _full_history(served, 3)[:4]]
        status, body = _post(url, {"dataframe_records": [{"user_id": known, "k": 3}, {"history": history + [10**12]}]})
        assert status == 200, body
        first, second = body["predictions"]
        assert len(first["items"]) == 3 and first["source"] == "model"
        assert second["unknown_items"] == 1 and len(second["items"]) == 10 and not set(second["items"]) & set(history)
        assert first["user_id"] == str(known) and second["user_id"] is None  # JSON null, not NaN
        expected, _ = Recommender.load(pq_dir).recommend([_full_history(served, 0)], k=3)
        assert first["items"] == [int(served["item_id"][i]) for i in expected[0].tolist()]
        # The MMR re-ranking option (pipeline/models/rerank.py) in the champion's own item space.
        status, body = _post(url, {"dataframe_records": [{"user_id": known, "k": 3, "diversity": 0.7}]})
        assert status == 200, body
        from pipeline.models.rerank import candidate_count, mmr_rerank, unit_rows

        champion = Recommender.load(pq_dir)
        candidates, scores = champion.recommend([_full_history(served, 0)], k=candidate_count(3, champion.n_items))
        reranked, _ = mmr_rerank(candidates, scores, unit_rows(champion.model.item_weights()), 3, 0.7)
        assert body["predictions"][0]["items"] == [int(served["item_id"][i]) for i in reranked[0].tolist()]
        for payload, message in [
            ({"dataframe_records": [{"k": 3}]}, "user_id"),
            ({"dataframe_records": [{"user_id": known, "k": 0}]}, "k must be between"),
            ({"dataframe_records": [{"user_id": known, "k": 10**7}]}, "k must be between"),
            ({"dataframe_records": [{"user_id": "somebody"}]}, "user IDs are integers"),
            ({"dataframe_records": [{"history": [1, "x"]}]}, "item IDs are integers"),
            ({"dataframe_split": {"columns": ["history"], "data": [[[1, 2]]]}, "params": {"bogus": 1}}, None),
            ({"dataframe_records": [{"history": "not a list"}]}, "history"),
            ({"dataframe_records": [{"user_id": known, "K": 3}]}, "unknown column(s) ['K']"),  # not dropped by MLflow
            ({"dataframe_records": [{"user_id": known, "diversity": 1.5}]}, "diversity must be a number between 0 and 1"),
        ]:
            status, body = _post(url, payload)
            if message is None:  # a well-formed request in another layout still works
                assert status == 200 and len(body["predictions"][0]["items"]) == 10, body
                continue
            assert 400 <= status < 500, (payload, status, body)
            assert message in body["message"], (payload, body)
    finally:
        _stop(proc)


def test_the_model_ships_exactly_the_modules_serving_imports(tmp_path):
    """SERVED_MODULES is the import closure of the pyfunc (lazy imports included), and that copy imports alone."""
    import subprocess
    import sys

    import grimp

    from pipeline.serving.pyfunc import SERVED_MODULES, served_code
    from tests.import_graph import imported_files

    closure = imported_files(grimp.build_graph("pipeline"), ("pipeline.serving.pyfunc",))
    assert set(SERVED_MODULES) == {str(file.relative_to("pipeline")) for file in closure}

    package = served_code(tmp_path / "code")
    shipped = sorted(str(p.relative_to(package)) for p in package.rglob("*.py") if p.name != "__init__.py")
    assert shipped == sorted(SERVED_MODULES)
    assert not (package / "data" / "validation").exists() and not (package / "training").exists()
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import pipeline.serving.pyfunc as served; "
             "assert served.__file__.startswith(sys.argv[1]), served.__file__")
    subprocess.run([sys.executable, "-c", probe, str(tmp_path / "code")], check=True, cwd=tmp_path)


@pytest.mark.slow
def test_the_leanrec_server_guards_mlflows_app_over_http(served, tmp_path):
    """python -m pipeline.serving.server with 2 workers: deep JSON, huge values, long histories and typos are 4xx."""
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": served["tracking_uri"], "MLFLOW_MODELS_WORKERS": "2"}
    proc = start_server([sys.executable, "-m", "pipeline.serving.server", "-m", served["teacher_info"].model_uri,
                         "--host", "127.0.0.1", "--port", str(port)], tmp_path, env)
    try:
        _wait_for(f"http://127.0.0.1:{port}/ping", proc)
        url = f"http://127.0.0.1:{port}/invocations"
        known = int(served["user_id"][served["data"].users[0]])
        status, body = _post(url, {"dataframe_records": [{"user_id": known, "k": 3}, {"history": [1, 2]}]})
        assert status == 200 and len(body["predictions"][0]["items"]) == 3, body
        deep = json.dumps({"dataframe_records": [{"history": 0}]}).replace("0", "[" * 100_000 + "]" * 100_000)
        request = urllib.request.Request(url, data=deep.encode(), headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=60)
        assert err.value.code == 400 and "nests 100003 levels deep" in json.loads(err.value.read())["message"]
        for payload, message in [
            ({"dataframe_records": [{"history": [1, 2], "K": 3}]}, "unknown column(s) ['K']"),
            ({"dataframe_records": [{"history": [1] * (MAX_HISTORY + 1)}]}, f"at most {MAX_HISTORY} are accepted"),
            ({"dataframe_records": [{"user_id": "u" * 20_000_000}]}, "user IDs are integers"),
        ]:
            status, body = _post(url, payload)
            assert status == 400 and message in body["message"], (status, str(body)[:500])
            assert len(json.dumps(body)) < 2000
        assert _worker_count(proc.pid) == 2  # MLFLOW_MODELS_WORKERS
    finally:
        _stop(proc)


def _worker_count(pid: int) -> int:
    """uvicorn's worker processes: the server's children started by multiprocessing's spawn (not its resource tracker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return sum(b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes() for child in children)
