"""Property-based fuzzing of request parsing (serving/pyfunc.py): any request is answered row for row or refused with a 400."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlflow.exceptions import MlflowException

from pipeline.serving.request import MAX_HISTORY, SHOWN_CHARS

FUZZ = settings(max_examples=80, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(-(2**70), 2**70), st.integers(-5, 400),  # ID ranges: beyond int64, and the catalogue's own
    st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 50).map(math.floor).map(float),  # 3.0 is an integer
    st.text(max_size=30), st.text(min_size=2000, max_size=3000),  # a long value must come back short
)
values = st.recursive(scalars, lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=5), children, max_size=3),
                      max_leaves=20)
histories = st.one_of(st.lists(st.integers(-3, 400), max_size=40), st.lists(values, max_size=5), values,
                      st.integers(MAX_HISTORY - 2, MAX_HISTORY + 2).map(lambda n: [1] * n))
columns = st.sampled_from(["user_id", "history", "k", "K", "user", "", "history "])
rows = st.dictionaries(columns, st.one_of(values, histories), max_size=3)
requests = st.lists(rows, min_size=0, max_size=6)


def _check_answer(model, request, n_rows: int) -> None:
    try:
        response = model.predict(request)
    except MlflowException as err:
        assert err.get_http_status_code() == 400, err.message
        # Column names, values and types are quoted as short reprs: the message stays short whatever came in.
        assert len(err.message) <= 300 + 6 * SHOWN_CHARS, err.message[:500]
        return
    assert len(response) == n_rows  # every row answered
    assert set(response["source"]) <= {"model", "popularity"}
    for items, scores in zip(response["items"], response["scores"], strict=True):
        assert len(items) == len(scores) and len(set(items)) == len(items)


@pytest.mark.fuzz
@FUZZ
@given(requests)
def test_any_records_request_is_answered_or_refused_with_a_400(served, records):
    _check_answer(served["teacher"], records, len(records))


@pytest.mark.fuzz
@FUZZ
@given(requests)
def test_any_table_request_is_answered_or_refused_with_a_400(served, records):
    """The DataFrame MLflow's scoring server builds from dataframe_records (missing cells are NaN there)."""
    _check_answer(served["teacher"], pd.DataFrame(records), len(records))


@pytest.mark.fuzz
@FUZZ
@given(st.lists(st.fixed_dictionaries({"history": st.lists(st.integers(1, 10**6), max_size=30)},
                                      optional={"k": st.integers(1, 40)}), min_size=1, max_size=8))
def test_well_formed_histories_are_always_answered_with_k_items(served, records):
    """Known or unknown items, any length up to the cap: k items (or the catalogue, if smaller), none of the history."""
    response = served["teacher"].predict(pd.DataFrame(records))
    n_items = served["data"].n_items
    for record, (_, row) in zip(records, response.iterrows(), strict=True):
        known = {i for i in record["history"] if i in served["item_index"]}
        assert row["unknown_items"] == sum(1 for i in record["history"] if i not in served["item_index"])
        assert len(row["items"]) == min(record.get("k", 10), n_items - (len(known) if known else 0))
        assert not set(row["items"]) & known
