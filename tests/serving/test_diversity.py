"""The served model's `diversity` request field: MMR re-ranking (pipeline/models/rerank.py), in process and over HTTP."""

from __future__ import annotations

import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from starlette.testclient import TestClient

from pipeline.models.recommender import Recommender
from pipeline.models.rerank import candidate_count, mmr_rerank, unit_rows
from pipeline.serving.server import guarded_app
from tests.serving.helpers import full_history


def _expected(served, row: int, k: int, weight: float) -> list[int]:
    """MMR with `weight` over the teacher's top candidate_count(k) of the user's whole history, as raw IDs."""
    rec = Recommender.load(served["layout"].model_dir("main"))
    candidates, scores = rec.recommend([full_history(served, row)], k=candidate_count(k, rec.n_items))
    items, _ = mmr_rerank(candidates, scores, unit_rows(rec.model.item_weights()), k, weight)
    return [int(served["item_id"][i]) for i in items[0].tolist()]


def _known(served, row: int) -> int:
    return int(served["user_id"][served["data"].users[row]])


def test_diversity_reranks_the_known_users_list_by_mmr(served):
    plain = served["teacher"].predict(pd.DataFrame({"user_id": [_known(served, 0)], "k": [6]})).iloc[0]
    off = served["teacher"].predict(pd.DataFrame({"user_id": [_known(served, 0)], "k": [6], "diversity": [0.0]})).iloc[0]
    assert list(off["items"]) == list(plain["items"]) == _expected(served, 0, 6, 0.0)
    diverse = served["teacher"].predict(pd.DataFrame({"user_id": [_known(served, 0)], "k": [6], "diversity": [0.8]})).iloc[0]
    assert list(diverse["items"]) == _expected(served, 0, 6, 0.8) != list(plain["items"])
    assert len(set(diverse["items"])) == 6
    assert not {served["item_index"][i] for i in diverse["items"]} & set(full_history(served, 0))


def test_each_row_gets_its_own_weight_and_k(served):
    rows = [(1, 4, 0.5), (2, 7, 0.0), (3, 3, 0.5), (4, 5, 1.0), (5, 10, None)]
    request = pd.DataFrame({"user_id": [_known(served, r) for r, _, _ in rows], "k": [k for _, k, _ in rows],
                            "diversity": [w for _, _, w in rows]})
    response = served["teacher"].predict(request)
    for position, (row, k, weight) in enumerate(rows):
        assert list(response.iloc[position]["items"]) == _expected(served, row, k, weight or 0.0), (row, k, weight)


@pytest.mark.parametrize("value", [1.5, -0.1, "0.5", True, [0.2]])
def test_bad_diversity_values_are_a_400(served, value):
    with pytest.raises(MlflowException, match="row 0: diversity must be a number between 0 and 1") as err:
        served["teacher"].predict(pd.DataFrame({"user_id": [_known(served, 0)], "diversity": pd.Series([value], dtype=object)}))
    assert err.value.get_http_status_code() == 400


def test_the_served_model_takes_diversity_over_http(served):
    """Through MLflow's scoring app behind the LeanRec guard (serving/server.py), as `python -m pipeline.serving.server` serves it."""
    with TestClient(guarded_app(served["teacher"]), raise_server_exceptions=False) as client:
        known = _known(served, 0)
        response = client.post("/invocations", json={"dataframe_records": [{"user_id": known, "k": 6, "diversity": 0.8},
                                                                           {"user_id": known, "k": 6}]})
        assert response.status_code == 200, response.text
        diverse, plain = response.json()["predictions"]
        assert diverse["items"] == _expected(served, 0, 6, 0.8) and plain["items"] == _expected(served, 0, 6, 0.0)
        for bad in (2, -1, "high"):
            response = client.post("/invocations", json={"dataframe_records": [{"user_id": known, "diversity": bad}]})
            assert response.status_code == 400, response.text
            assert "diversity must be a number between 0 and 1" in response.json()["message"]
