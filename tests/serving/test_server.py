"""The HTTP model server (serving/server.py): MLflow's scoring app behind RequestGuard, in process."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from pipeline.serving.server import MAX_JSON_DEPTH, RequestGuard, guarded_app, json_depth, main


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.fixture(scope="module")
def client(served):
    with TestClient(guarded_app(served["teacher"]), raise_server_exceptions=False) as test_client:
        yield test_client


def _invoke(client: TestClient, body: str | bytes, content_type: str = "application/json"):
    return client.post("/invocations", content=body, headers={"Content-Type": content_type})


def test_a_deeply_nested_json_is_a_400_not_a_500(served, client):
    deep = json.dumps({"dataframe_records": [{"history": "PLACEHOLDER"}]}).replace('"PLACEHOLDER"', _nested(100_000))
    response = _invoke(client, deep)
    assert response.status_code == 400, response.text
    assert response.json() == {"error_code": "BAD_REQUEST",
                               "message": f"the request JSON nests 100003 levels deep; at most {MAX_JSON_DEPTH} are accepted"}
    # MLflow's own app, unguarded, fails on the same body inside json.loads (RecursionError): the reason for the guard.
    from mlflow.pyfunc import scoring_server

    with TestClient(scoring_server.init(served["teacher"]), raise_server_exceptions=False) as bare:
        assert _invoke(bare, deep).status_code == 500


def test_requests_within_the_limits_reach_mlflows_app_unchanged(client):
    response = _invoke(client, json.dumps({"dataframe_records": [{"history": [1, 2, 3], "k": 4}]}))
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"][0]["items"]) == 4
    assert client.get("/ping").status_code == 200 and client.get("/version").status_code == 200
    split = {"dataframe_split": {"columns": ["history"], "data": [[[1, 2]]]}}
    assert _invoke(client, json.dumps(split)).status_code == 200
    # A CSV body is not checked for nesting (brackets there are not JSON), and reaches MLflow's CSV parser.
    assert _invoke(client, "user_id\n1\n", "text/csv").status_code == 200


def test_a_misspelt_column_over_http_is_a_400_naming_it(client):
    response = _invoke(client, json.dumps({"dataframe_records": [{"history": [1, 2], "K": 3}]}))
    assert response.status_code == 400
    assert "unknown column(s) ['K']" in response.json()["message"]


def test_a_huge_value_comes_back_as_a_short_error(client):
    response = _invoke(client, json.dumps({"dataframe_records": [{"user_id": "u" * 20_000_000}]}))
    assert response.status_code == 400
    # MLflow prefixes the message with the request table as pandas prints it (cells cut at 50 characters).
    assert len(response.content) < 2000 and "user IDs are integers" in response.json()["message"]


def test_a_body_over_the_limit_is_a_413(served):
    app = RequestGuard(guarded_app(served["teacher"]).app, max_body_bytes=1000)
    with TestClient(app, raise_server_exceptions=False) as small:
        body = json.dumps({"dataframe_records": [{"history": list(range(400))}]})
        response = _invoke(small, body)
        assert response.status_code == 413 and "over 1000 bytes" in response.json()["message"]

        def chunks():  # no Content-Length: the limit holds while the body is read
            for _ in range(5):
                yield b" " * 400

        response = small.post("/invocations", content=chunks(), headers={"Content-Type": "application/json"})
        assert response.status_code == 413


def _true_depth(value) -> int:
    if isinstance(value, list):
        return 1 + max((_true_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_true_depth(v) for v in value.values()), default=0)
    return 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(alphabet='[]{}"\\ab\u00e9,:'),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(alphabet='[]{}"\\k'), children, max_size=4),
    max_leaves=30,
)


@pytest.mark.fuzz
@settings(max_examples=100, deadline=None, database=None)
@given(json_values, st.booleans())
def test_json_depth_is_the_nesting_of_any_json(value, ascii_only):
    """Brackets inside strings (escaped quotes too) never count; the answer is the true nesting."""
    assert json_depth(json.dumps(value, ensure_ascii=ascii_only).encode()) == _true_depth(value)


request_bodies = st.one_of(
    st.binary(max_size=200),
    st.integers(0, 3000).map(_nested),
    st.builds(lambda depth, rows: json.dumps({"dataframe_records": rows}).replace("null", _nested(depth), 1),
              st.integers(0, 2000), st.lists(st.fixed_dictionaries({"history": st.none()}), min_size=1, max_size=3)),
    json_values.map(lambda v: json.dumps({"dataframe_records": v})),
    json_values.map(lambda v: json.dumps({"dataframe_split": {"columns": ["history"], "data": v}})),
)


@pytest.mark.fuzz
@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request_bodies)
def test_no_request_body_gets_a_500(client, body):
    response = _invoke(client, body)
    assert response.status_code in (200, 400, 413), (response.status_code, response.text[:500])


def test_workers_come_from_the_flag_or_mlflows_variable(monkeypatch):
    started = {}
    monkeypatch.setattr("mlflow.artifacts.download_artifacts", lambda artifact_uri: f"/local/{artifact_uri}")
    monkeypatch.setattr("uvicorn.run", lambda app, **kwargs: started.update(app=app, **kwargs))
    monkeypatch.setenv("MLFLOW_MODELS_WORKERS", "3")
    main(["-m", "models:/leanrec@champion", "--port", "5009"])
    assert started == {"app": "pipeline.serving.server:create_app", "factory": True, "host": "127.0.0.1",
                       "port": 5009, "workers": 3}
    main(["-m", "models:/leanrec@champion", "--workers", "2"])
    assert started["workers"] == 2
    with pytest.raises(SystemExit):
        main(["-m", "models:/leanrec@champion", "--workers", "0"])


@pytest.mark.parametrize(("row", "message"), [
    ({"history": [1], "K" * 20_000_000: 1}, "unknown column(s) ['KKKKKKKK"),  # MLflow's prefix prints column names whole
    ({"history": ["h" * 20_000_000]}, "item IDs are integers, got 'hhhh"),
    ({"history": [1] * 5_000_000}, "history holds 5000000 items"),
    ({"k": "k" * 20_000_000, "history": [1]}, "k must be an integer, got 'kkk"),
])
def test_no_error_over_http_echoes_a_huge_value(client, row, message):
    """MLflow prefixes a 400's message with the request table as pandas prints it: that too must stay short."""
    response = _invoke(client, json.dumps({"dataframe_records": [row]}))
    assert response.status_code == 400
    assert len(response.content) < 3000 and message in response.json()["message"], response.content[:3000]
    assert response.headers["content-length"] == str(len(response.content))
