"""Tests of the validate stage (pipeline/data/validation/) on small frames written to a tmp Layout.

Each row carries a unique `source` ("row7"), so a test can tell exactly which rows went where.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.config import ValidateConfig
from pipeline.core.errors import ValidationFailed
from pipeline.core.io import Layout, write_parquet
from pipeline.core.schema import RAW_COLUMNS, raw_schema
from pipeline.data.validation import frame as validation_frame
from pipeline.data.validation import routing, rules, run_validate

UTC = dt.UTC
NOW = dt.datetime(2024, 1, 1, tzinfo=UTC)
START = dt.datetime(2023, 1, 1, tzinfo=UTC)
N = 40


@pytest.fixture
def lay(tmp_path) -> Layout:
    return Layout(tmp_path / "work")


def config(**overrides) -> ValidateConfig:
    # A loose share so that a few bad rows out of N do not fail the batch (tested separately).
    return ValidateConfig(**({"min_rows": 10, "max_quarantine_share": 0.5, "data_docs": False} | overrides))


def columns(n: int = N, string_ids: bool = False) -> dict[str, list]:
    """Clean rows: distinct keys, timestamps an hour apart in 2023, ratings 1..5."""
    return {
        "user_id": [f"u{i % 7}" if string_ids else i % 7 for i in range(n)],
        "item_id": [f"i{i}" if string_ids else 100 + i for i in range(n)],
        "timestamp": [START + dt.timedelta(hours=i) for i in range(n)],
        "rating": [float(1 + i % 5) for i in range(n)],
        "source": [f"row{i}" for i in range(n)],
    }


def table_of(cols: dict[str, list], string_ids: bool = False) -> pa.Table:
    return pa.table(cols, schema=raw_schema(pa.string() if string_ids else pa.int64()))


def write_raw(lay: Layout, data: dict[str, list] | pa.Table, string_ids: bool = False) -> pa.Table:
    table = data if isinstance(data, pa.Table) else table_of(data, string_ids)
    write_parquet(table, lay.raw_interactions)
    return table


def quarantine_path(lay: Layout):
    return lay.quarantine_dir / "validate.parquet"


def read_quarantine(lay: Layout) -> pd.DataFrame:
    return pq.read_table(quarantine_path(lay)).to_pandas()


def validated_sources(lay: Layout) -> list[str]:
    return pq.read_table(lay.validated_interactions, columns=["source"]).column("source").to_pylist()


def summary(lay: Layout) -> dict:
    return json.loads((lay.reports_dir / "validation.json").read_text())


def expectation(result_or_summary, check: str) -> dict:
    entries = result_or_summary["expectations"] if isinstance(result_or_summary, dict) else result_or_summary.expectations
    (entry,) = [e for e in entries if e["check"] == check]
    return entry


# ---------------------------------------------------------------------------- clean data


@pytest.mark.parametrize("string_ids", [False, True], ids=["int_ids", "string_ids"])
def test_clean_data_passes_unchanged(lay, string_ids, engine):
    table = write_raw(lay, columns(string_ids=string_ids), string_ids)

    result = run_validate(config(), lay, now=NOW, engine=engine)

    assert (result.rows_in, result.rows_passed, result.rows_quarantined) == (N, N, 0)
    assert result.quarantined_by_reason == {}
    validated = pq.read_table(lay.validated_interactions)
    assert validated.schema.remove_metadata() == table.schema.remove_metadata()  # types kept exactly
    assert validated.equals(table.replace_schema_metadata(validated.schema.metadata))
    quarantine = pq.read_table(quarantine_path(lay))
    assert quarantine.num_rows == 0
    assert quarantine.column_names == [*RAW_COLUMNS, "reason", "stage"]
    report = summary(lay)
    assert report["success"] is True
    assert report["rows_accounted_for"] is True
    assert (report["rows_in"], report["rows_passed"], report["rows_quarantined"]) == (N, N, 0)
    assert report["quarantine_share"] == 0.0
    assert report["gx_version"].startswith("1.")
    assert all(e["success"] for e in report["expectations"])
    assert report["expectations"] == result.expectations
    assert result.summary_path == lay.reports_dir / "validation.json"


def test_other_tz_aware_timestamps_and_float64_ratings_are_accepted(lay, engine):
    cols = columns()
    cols["timestamp"][3] = NOW + dt.timedelta(hours=2)  # in the future whatever the zone shows
    table = table_of(cols)
    table = table.set_column(2, "timestamp", table.column("timestamp").cast(pa.timestamp("ms", tz="Europe/Paris")))
    table = table.set_column(3, "rating", table.column("rating").cast(pa.float64()))
    write_raw(lay, table)

    result = run_validate(config(), lay, now=NOW, engine=engine)

    assert result.quarantined_by_reason == {"timestamp_in_future": 1}
    validated = pq.read_table(lay.validated_interactions)
    assert validated.schema.field("timestamp").type == pa.timestamp("ms", tz="Europe/Paris")
    assert validated.schema.field("rating").type == pa.float64()


def test_suite_covers_every_rule(lay, engine):
    write_raw(lay, columns())
    result = run_validate(config(), lay, now=NOW, engine=engine)

    by_check = {e["check"]: e for e in result.expectations}
    assert set(by_check) == {
        *(f"column_exists:{c}" for c in RAW_COLUMNS),
        *(f"type:{c}" for c in RAW_COLUMNS),
        "min_rows",
        "not_null:user_id",
        "not_null:item_id",
        "not_null:timestamp",
        "not_null:rating",
        "min:timestamp",
        "max:timestamp",
        "range:rating",
        "unique:user_id,item_id,timestamp",
    }
    assert by_check["min_rows"]["observed_value"] == N
    assert by_check["range:rating"]["kwargs"]["min_value"] == 0.0
    assert by_check["range:rating"]["kwargs"]["max_value"] == 5.0
    assert by_check["min:timestamp"]["kwargs"]["min_value"] == "1995-01-01T00:00:00+00:00"
    assert by_check["max:timestamp"]["kwargs"]["max_value"] == (NOW + dt.timedelta(hours=1)).isoformat()
    assert by_check["unique:user_id,item_id,timestamp"]["expectation"] == "expect_compound_columns_to_be_unique"


# ---------------------------------------------------------------------------- row-level rules


def _set(cols, column, rows, value):
    for r in rows:
        cols[column][r] = value


def _copy_key_of_row_2(cols, rows):
    for r in rows:
        for c in ("user_id", "item_id", "timestamp"):
            cols[c][r] = cols[c][2]


ROW_DEFECTS = {
    "null_user_id": (lambda c, rows: _set(c, "user_id", rows, None), "not_null:user_id"),
    "null_item_id": (lambda c, rows: _set(c, "item_id", rows, None), "not_null:item_id"),
    "null_timestamp": (lambda c, rows: _set(c, "timestamp", rows, None), "not_null:timestamp"),
    "timestamp_before_min": (
        lambda c, rows: _set(c, "timestamp", rows, dt.datetime(1994, 12, 31, 23, 59, tzinfo=UTC)),
        "min:timestamp",
    ),
    "timestamp_in_future": (lambda c, rows: _set(c, "timestamp", rows, NOW + dt.timedelta(hours=2)), "max:timestamp"),
    "null_rating": (lambda c, rows: _set(c, "rating", rows, None), "not_null:rating"),
    "rating_out_of_range": (
        lambda c, rows: (_set(c, "rating", rows[:1], 5.5), _set(c, "rating", rows[1:], -0.5)),
        "range:rating",
    ),
    "duplicate": (_copy_key_of_row_2, "unique:user_id,item_id,timestamp"),
}


@pytest.mark.parametrize("string_ids", [False, True], ids=["int_ids", "string_ids"])
@pytest.mark.parametrize("reason", list(ROW_DEFECTS))
def test_each_row_level_reason_is_quarantined(lay, reason, string_ids, engine):
    bad_rows = [3, 17, 31]
    cols = columns(string_ids=string_ids)
    inject, check = ROW_DEFECTS[reason]
    inject(cols, bad_rows)
    write_raw(lay, cols, string_ids)

    result = run_validate(config(), lay, now=NOW, engine=engine)

    assert result.quarantined_by_reason == {reason: 3}
    assert (result.rows_in, result.rows_passed, result.rows_quarantined) == (N, N - 3, 3)
    quarantine = read_quarantine(lay)
    assert quarantine["source"].tolist() == [f"row{r}" for r in bad_rows]
    assert quarantine["reason"].tolist() == [reason] * 3
    assert quarantine["stage"].tolist() == ["validate"] * 3
    assert validated_sources(lay) == [f"row{i}" for i in range(N) if i not in bad_rows]
    gx_entry = expectation(result, check)
    assert gx_entry["success"] is False
    # GX counts every member of a repeated key (row 2 too); the quarantine keeps the first.
    assert gx_entry["unexpected_count"] == (4 if reason == "duplicate" else 3)
    assert gx_entry["reason"] == reason
    assert gx_entry["partial_unexpected_rows"] == ([2, *bad_rows] if reason == "duplicate" else bad_rows)
    report = summary(lay)
    assert report["success"] is True
    assert report["quarantined_by_reason"] == {reason: 3}


def test_nan_rating_counts_as_null(lay, engine):
    cols = columns()
    cols["rating"][5] = math.nan  # Arrow keeps NaN apart from null; the stage treats both as missing
    write_raw(lay, cols)

    result = run_validate(config(), lay, now=NOW, engine=engine)

    assert result.quarantined_by_reason == {"null_rating": 1}
    assert read_quarantine(lay)["source"].tolist() == ["row5"]


def test_quarantine_keeps_original_columns_and_types(lay, engine):
    cols = columns()
    cols["user_id"][4] = None
    cols["rating"][6] = 9.0
    cols["source"][6] = "row6-extra"
    table = write_raw(lay, cols)

    run_validate(config(), lay, now=NOW, engine=engine)

    quarantine = pq.read_table(quarantine_path(lay))
    for field in table.schema:
        assert quarantine.schema.field(field.name).type == field.type  # int64 ids stay int64 despite the null
    assert quarantine.schema.field("reason").type == pa.string()
    assert quarantine.schema.field("stage").type == pa.string()
    assert quarantine.column("user_id").to_pylist() == [None, 6]
    assert quarantine.column("rating").to_pylist() == [5.0, 9.0]
    assert quarantine.column("source").to_pylist() == ["row4", "row6-extra"]
    assert pq.read_table(lay.validated_interactions).schema.field("user_id").type == pa.int64()


def test_first_failing_reason_wins(lay, engine):
    cols = columns()
    cols["user_id"][1] = None  # and out of range: null_user_id comes first
    cols["rating"][1] = 99.0
    cols["timestamp"][2] = dt.datetime(1980, 1, 1, tzinfo=UTC)  # and null rating: the timestamp comes first
    cols["rating"][2] = None
    cols["item_id"][3] = None  # and in the future: null_item_id comes first
    cols["timestamp"][3] = NOW + dt.timedelta(days=1)
    write_raw(lay, cols)

    result = run_validate(config(), lay, now=NOW, engine=engine)

    quarantine = read_quarantine(lay)
    assert dict(zip(quarantine["source"], quarantine["reason"], strict=True)) == {
        "row1": "null_user_id",
        "row2": "timestamp_before_min",
        "row3": "null_item_id",
    }
    assert result.quarantined_by_reason == {"null_user_id": 1, "null_item_id": 1, "timestamp_before_min": 1}
    # GX still counts each rule on its own: row 1's rating is out of range too.
    assert expectation(result, "range:rating")["unexpected_count"] == 1
    assert summary(lay)["rule_violations"]["rating_out_of_range"] == 1


def test_every_row_ends_up_in_exactly_one_output(lay, engine):
    rng = np.random.default_rng(7)
    n = 500
    cols = columns(n)
    for i in rng.choice(n, 60, replace=False):
        kind = i % 6
        if kind == 0:
            cols["user_id"][i] = None
        elif kind == 1:
            cols["timestamp"][i] = None
        elif kind == 2:
            cols["rating"][i] = 7.5
        elif kind == 3:
            cols["timestamp"][i] = NOW + dt.timedelta(days=3)
        else:  # duplicates of the row before
            for c in ("user_id", "item_id", "timestamp"):
                cols[c][i] = cols[c][i - 1]
    write_raw(lay, cols)

    result = run_validate(config(min_rows=100), lay, now=NOW, engine=engine)

    assert result.rows_in == n == result.rows_passed + result.rows_quarantined
    assert result.rows_quarantined > 0
    assert sum(result.quarantined_by_reason.values()) == result.rows_quarantined
    passed, quarantined = validated_sources(lay), read_quarantine(lay)["source"].tolist()
    assert len(passed) == result.rows_passed
    assert len(quarantined) == result.rows_quarantined
    assert sorted(passed + quarantined) == sorted(cols["source"])  # nothing lost, nothing doubled
    report = summary(lay)
    assert report["rows_in"] == report["rows_passed"] + report["rows_quarantined"]
    assert report["rows_accounted_for"] is True
    assert report["quarantine_share"] == pytest.approx(result.rows_quarantined / n)


# ---------------------------------------------------------------------------- duplicates


def test_duplicates_keep_the_first_occurrence(lay, engine):
    cols = columns()
    for r in (10, 20, 30):  # three later copies of row 5's key, different ratings
        for c in ("user_id", "item_id", "timestamp"):
            cols[c][r] = cols[c][5]
    write_raw(lay, cols)

    result = run_validate(config(), lay, now=NOW, engine=engine)

    assert result.quarantined_by_reason == {"duplicate": 3}
    assert read_quarantine(lay)["source"].tolist() == ["row10", "row20", "row30"]
    assert "row5" in validated_sources(lay)


def test_an_invalid_first_copy_does_not_knock_out_a_valid_later_one(lay, engine):
    cols = columns()
    cols["rating"][5] = 42.0  # first copy is invalid ...
    for c in ("user_id", "item_id", "timestamp"):
        cols[c][9] = cols[c][5]  # ... the later copy is fine and must survive
    write_raw(lay, cols)

    result = run_validate(config(), lay, now=NOW, engine=engine)

    assert result.quarantined_by_reason == {"rating_out_of_range": 1}
    assert read_quarantine(lay)["source"].tolist() == ["row5"]
    assert "row9" in validated_sources(lay)
    assert expectation(result, "unique:user_id,item_id,timestamp")["unexpected_count"] == 2


def test_rows_with_same_user_and_item_at_other_times_are_not_duplicates(lay, engine):
    cols = columns()
    cols["item_id"] = [100] * N  # same (user, item) pairs repeat, every timestamp differs
    write_raw(lay, cols)

    result = run_validate(config(), lay, now=NOW, engine=engine)

    assert result.rows_quarantined == 0


@pytest.mark.parametrize("string_ids", [False, True], ids=["int_ids", "string_ids"])
def test_duplicate_prefilter_is_a_superset_of_the_duplicates(string_ids):
    rng = np.random.default_rng(3)
    n = 5000
    users = rng.integers(0, 30, n)
    items = rng.integers(0, 30, n)
    stamps = START + pd.to_timedelta(rng.integers(0, 40, n), unit="s")
    frame = pd.DataFrame(
        {
            "user_id": [f"ü{u}" * (1 + u % 3) for u in users] if string_ids else pd.array(users, dtype="Int64"),
            "item_id": [f"item-{i}" for i in items] if string_ids else pd.array(items, dtype="Int64"),
            "timestamp": stamps,
        }
    )
    frame.loc[rng.random(n) < 0.05, "user_id"] = None
    frame.loc[rng.random(n) < 0.05, "timestamp"] = None
    table = pa.Table.from_pandas(frame, preserve_index=False)
    assert table.schema.field("user_id").type == (pa.large_string() if string_ids else pa.int64())
    complete = frame.notna().all(axis=1).to_numpy()

    candidates = validation_frame.key_hash_repeated(table, complete)

    duplicated = np.zeros(n, dtype=bool)
    duplicated[complete] = frame[complete].duplicated(keep=False).to_numpy()
    assert duplicated.sum() > 100
    assert not (duplicated & ~candidates).any()  # sound: no duplicate is missed
    assert not (candidates & ~complete).any()
    assert candidates.sum() < duplicated.sum() * 1.1  # and selective


# ---------------------------------------------------------------------------- timestamps


def test_future_is_relative_to_the_injected_now(lay, engine):
    cols = columns()
    cols["timestamp"][7] = NOW + dt.timedelta(minutes=30)  # inside the 1 h tolerance
    cols["timestamp"][8] = NOW + dt.timedelta(hours=1)  # exactly at the bound: passes
    cols["timestamp"][9] = NOW + dt.timedelta(hours=1, microseconds=1)
    cols["timestamp"][11] = NOW + dt.timedelta(days=30)
    write_raw(lay, cols)

    result = run_validate(config(), lay, now=NOW, engine=engine)
    assert result.quarantined_by_reason == {"timestamp_in_future": 2}
    assert read_quarantine(lay)["source"].tolist() == ["row9", "row11"]

    later = run_validate(config(), lay, now=NOW + dt.timedelta(days=31), engine=engine)
    assert later.rows_quarantined == 0

    no_tolerance = run_validate(config(future_tolerance_s=0), lay, now=NOW, engine=engine)
    assert no_tolerance.quarantined_by_reason == {"timestamp_in_future": 4}


def test_min_timestamp_bound_is_inclusive_and_configurable(lay, engine):
    cols = columns()
    cols["timestamp"][0] = dt.datetime(1995, 1, 1, tzinfo=UTC)  # exactly the default minimum
    cols["timestamp"][1] = dt.datetime(1994, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    write_raw(lay, cols)

    assert run_validate(config(), lay, now=NOW, engine=engine).quarantined_by_reason == {"timestamp_before_min": 1}
    stricter = run_validate(config(min_timestamp=dt.datetime(2023, 1, 1, 5, tzinfo=UTC)), lay, now=NOW, engine=engine)
    # rows 0, 1 and rows 2..4 (2023-01-01 02:00..04:00)
    assert stricter.quarantined_by_reason == {"timestamp_before_min": 5}


def test_rating_bounds_come_from_config(lay, engine):
    write_raw(lay, columns())  # ratings 1..5
    result = run_validate(config(rating_min=2.0, rating_max=4.0), lay, now=NOW, engine=engine)
    assert result.quarantined_by_reason == {"rating_out_of_range": 16}  # the 8 ones and the 8 fives


# ---------------------------------------------------------------------------- batch failures


def _drop(name):
    return lambda t: t.drop_columns([name])


def _cast(name, arrow_type):
    def change(t: pa.Table) -> pa.Table:
        i = t.column_names.index(name)
        return t.set_column(i, name, t.column(name).cast(arrow_type))

    return change


def _replace(name, array):
    def change(t: pa.Table) -> pa.Table:
        return t.set_column(t.column_names.index(name), name, array)

    return change


BATCH_BREAKERS = {
    "missing_rating": (_drop("rating"), "expect_column_to_exist(rating)"),
    "missing_user_id": (_drop("user_id"), "expect_column_to_exist(user_id)"),
    "user_id_float": (_cast("user_id", pa.float64()), "expect_column_values_to_be_in_type_list(user_id)"),
    "item_id_int32": (_cast("item_id", pa.int32()), "expect_column_values_to_be_in_type_list(item_id)"),
    "timestamp_naive": (_cast("timestamp", pa.timestamp("us")), "expect_column_values_to_be_of_type(timestamp)"),
    "timestamp_string": (_cast("timestamp", pa.string()), "expect_column_values_to_be_of_type(timestamp)"),
    "rating_string": (_cast("rating", pa.string()), "expect_column_values_to_be_in_type_list(rating)"),
    "rating_int": (_cast("rating", pa.int64()), "expect_column_values_to_be_in_type_list(rating)"),
    "source_null_type": (_replace("source", pa.nulls(N)), "expect_column_values_to_be_in_type_list(source)"),
}


def assert_batch_failed(lay: Layout, err: pytest.ExceptionInfo, *needles: str) -> dict:
    message = str(err.value)
    for needle in needles:
        assert needle in message
    assert not lay.validated_interactions.exists()
    report = summary(lay)
    assert report["success"] is False
    assert report["outputs"]["validated"] is None
    assert report["failures"]
    assert all(isinstance(f, str) for f in report["failures"])
    return report


@pytest.mark.parametrize("breaker", list(BATCH_BREAKERS))
def test_schema_problems_fail_the_batch(lay, breaker, engine):
    change, expected_name = BATCH_BREAKERS[breaker]
    write_raw(lay, change(table_of(columns())))

    with pytest.raises(ValidationFailed) as err:
        run_validate(config(), lay, now=NOW, engine=engine)

    report = assert_batch_failed(lay, err, expected_name, f"rows_in={N}")
    assert not quarantine_path(lay).exists()
    assert len(report["failures"]) == 1  # only the broken column is reported
    assert err.value.exit_code == 3


@pytest.mark.parametrize("content", [b"this is not parquet", b""], ids=["garbage", "empty_file"])
def test_unreadable_input_fails_the_batch(lay, content, engine):
    lay.raw_interactions.parent.mkdir(parents=True)
    lay.raw_interactions.write_bytes(content)

    with pytest.raises(ValidationFailed) as err:
        run_validate(config(), lay, now=NOW, engine=engine)

    report = assert_batch_failed(lay, err, "readable_parquet", "not a readable Parquet file")
    assert report["checks"][0]["check"] == "readable_parquet"
    assert report["checks"][0]["success"] is False


def test_missing_input_fails_the_batch(lay, engine):
    with pytest.raises(ValidationFailed) as err:
        run_validate(config(), lay, now=NOW, engine=engine)
    assert_batch_failed(lay, err, "readable_parquet", "does not exist")


def test_too_few_rows_fails_the_batch(lay, engine):
    write_raw(lay, columns())

    with pytest.raises(ValidationFailed) as err:
        run_validate(config(min_rows=N + 1), lay, now=NOW, engine=engine)

    report = assert_batch_failed(lay, err, "expect_table_row_count_to_be_between", f"{N} rows < validate.min_rows {N + 1}")
    assert expectation(report, "min_rows")["observed_value"] == N


def test_exactly_min_rows_passes(lay, engine):
    write_raw(lay, columns())
    assert run_validate(config(min_rows=N), lay, now=NOW, engine=engine).rows_passed == N


def test_quarantine_share_over_threshold_fails_the_batch(lay, engine):
    cols = columns()
    _set(cols, "user_id", range(10), None)  # 10 of 40 = 25 %
    write_raw(lay, cols)

    with pytest.raises(ValidationFailed) as err:
        run_validate(config(max_quarantine_share=0.05), lay, now=NOW, engine=engine)

    report = assert_batch_failed(
        lay, err, "max_quarantine_share", "10 of 40 rows quarantined", "rows_passed=30", "'null_user_id': 10"
    )
    assert report["quarantine_share"] == 0.25
    assert report["checks"][-1] == {
        "check": "max_quarantine_share",
        "success": False,
        "observed_value": 0.25,
        "threshold": 0.05,
    }
    # The quarantine is still written: it is what a person needs to look at.
    assert read_quarantine(lay)["source"].tolist() == [f"row{i}" for i in range(10)]


def test_quarantine_share_at_the_threshold_passes(lay, engine):
    cols = columns()
    _set(cols, "user_id", [0, 1], None)  # 2 of 40 = 5 %
    write_raw(lay, cols)
    result = run_validate(config(max_quarantine_share=0.05), lay, now=NOW, engine=engine)
    assert result.rows_quarantined == 2


def test_a_failed_batch_leaves_no_earlier_validated_output(lay, engine):
    write_raw(lay, columns())
    run_validate(config(), lay, now=NOW, engine=engine)
    assert lay.validated_interactions.exists()

    write_raw(lay, table_of(columns()).drop_columns(["timestamp"]))
    with pytest.raises(ValidationFailed, match=r"expect_column_to_exist\(timestamp\)"):
        run_validate(config(), lay, now=NOW, engine=engine)

    assert not lay.validated_interactions.exists()
    assert not quarantine_path(lay).exists()


# ---------------------------------------------------------------------------- one statement per rule, GX setup


def _tighten(monkeypatch, name: str, **expectation_attrs) -> None:
    """`rules.checks` with one check's GX expectation changed there alone (each rule is stated once)."""
    real_checks = rules.checks

    def tightened(*args):
        suite = real_checks(*args)
        (check,) = [c for c in suite if c.name == name]
        for attr, value in expectation_attrs.items():
            setattr(check.expectation, attr, value)
        return suite

    monkeypatch.setattr(rules, "checks", tightened)


def test_row_rules_are_stated_only_in_gx(lay, monkeypatch, engine):
    """Tighten the rating rule in its GX expectation alone: the quarantine follows GX."""
    cols = columns()
    cols["user_id"][4] = None  # rating 5.0 too: breaks two rules, the first reason wins
    write_raw(lay, cols)
    _tighten(monkeypatch, "range:rating", max_value=3.0)
    result = run_validate(config(max_quarantine_share=0.9), lay, now=NOW, engine=engine)

    quarantine = read_quarantine(lay)
    reasons = dict(zip(quarantine["source"], quarantine["reason"], strict=True))
    fours_and_fives = {f"row{i}" for i in range(N) if cols["rating"][i] > 3.0}
    assert reasons.pop("row4") == "null_user_id"
    assert reasons == {r: "rating_out_of_range" for r in fours_and_fives - {"row4"}}
    assert result.quarantined_by_reason == {"null_user_id": 1, "rating_out_of_range": len(fours_and_fives) - 1}
    entry = expectation(result, "range:rating")
    assert entry["kwargs"]["max_value"] == 3.0
    assert entry["unexpected_count"] == len(fours_and_fives)  # GX counts row 4 too
    assert summary(lay)["rule_violations"]["rating_out_of_range"] == len(fours_and_fives)


def test_failing_rows_are_gx_listed_ids_and_must_match_its_count():
    check = rules.Check("not_null:user_id", rules.SUITE_TABLE, None, ("user_id",), rules.NULL_USER)

    def result(listed, count):
        return SimpleNamespace(result={"unexpected_index_list": listed, "unexpected_count": count})

    assert routing.failing_rows(check, result([{rules.ROW_ID: [7, 2]}], 2), rows_in=10).tolist() == [7, 2]
    assert routing.failing_rows(check, result([], 0), rows_in=10).size == 0
    with pytest.raises(RuntimeError, match="listed 1 failing rows for not_null:user_id, counted 2"):
        routing.failing_rows(check, result([{rules.ROW_ID: [7]}], 2), rows_in=10)  # a sample, not every row
    with pytest.raises(RuntimeError, match="listed 1 failing rows"):
        routing.failing_rows(check, result([{rules.ROW_ID: [10]}], 1), rows_in=10)  # not a row of the input
    with pytest.raises(RuntimeError, match="listed no failing rows"):
        routing.failing_rows(check, SimpleNamespace(result={"unexpected_count": 0}), rows_in=10)


def test_gx_lists_every_failing_row_not_a_sample(lay, engine):
    cols = columns()
    _set(cols, "rating", range(0, N, 3), 6.0)  # 14 rows, more than GX's partial_unexpected_count
    write_raw(lay, cols)

    result = run_validate(config(), lay, now=NOW, engine=engine)

    assert read_quarantine(lay)["source"].tolist() == [f"row{i}" for i in range(0, N, 3)]
    entry = expectation(result, "range:rating")
    assert entry["unexpected_count"] == 14
    assert entry["partial_unexpected_rows"] == [0, 3, 6, 9, 12]
    assert entry["partial_unexpected_list"] == [6.0] * 5


def test_gx_context_is_offline_and_quiet(tmp_path):
    import os

    context = rules.gx_context(tmp_path / "docs")
    assert os.environ["GX_ANALYTICS_ENABLED"] == "false"
    assert context.config.analytics_enabled is False
    assert context.config.progress_bars.globally is False
    assert list(context.list_data_docs_sites()) == [rules.DATA_DOCS_SITE]


def test_extra_columns_pass_through(lay, engine):
    table = table_of(columns()).append_column("session", pa.array([i // 4 for i in range(N)], pa.int32()))
    cols = columns()
    write_raw(lay, table.set_column(0, "user_id", pa.array([None, *cols["user_id"][1:]], pa.int64())))

    result = run_validate(config(), lay, now=NOW, engine=engine)

    assert result.rows_quarantined == 1
    assert pq.read_table(lay.validated_interactions).column("session").to_pylist() == [i // 4 for i in range(1, N)]
    assert read_quarantine(lay)["session"].tolist() == [0]
    assert summary(lay)["extra_columns"] == ["session"]


def test_empty_input_passes_when_min_rows_is_zero(lay, engine):
    write_raw(lay, columns(0))
    result = run_validate(config(min_rows=0), lay, now=NOW, engine=engine)
    assert (result.rows_in, result.rows_passed, result.rows_quarantined) == (0, 0, 0)
    assert pq.read_table(lay.validated_interactions).num_rows == 0


# ---------------------------------------------------------------------------- data docs


def test_data_docs_are_built(lay, engine):
    write_raw(lay, columns())

    result = run_validate(config(data_docs=True), lay, now=NOW, engine=engine)

    index = lay.reports_dir / "data_docs" / "index.html"
    assert result.data_docs_path == index
    assert index.is_file()
    html = index.read_text(encoding="utf-8")
    assert rules.SUITE_TABLE in html
    assert rules.SUITE_RANGES in html
    assert str(lay.reports_dir) not in html  # relative links: the site can be moved or served
    assert sorted(p.name for p in lay.reports_dir.iterdir()) == ["data_docs", "validation.json"]  # no temp dirs left
    assert summary(lay)["outputs"]["data_docs"] == str(index)

    run_validate(config(data_docs=True), lay, now=NOW, engine=engine)  # a rebuild replaces the site
    assert index.is_file()
    assert sorted(p.name for p in lay.reports_dir.iterdir()) == ["data_docs", "validation.json"]


def test_data_docs_with_a_relative_workdir(tmp_path, monkeypatch, engine):
    monkeypatch.chdir(tmp_path)  # DVC runs the stage with the repository root as a relative workdir
    relative = Layout(Path("."))
    write_raw(relative, columns())

    result = run_validate(config(data_docs=True), relative, now=NOW, engine=engine)

    assert (tmp_path / "reports" / "data_docs" / "index.html").is_file()
    assert result.data_docs_path == Path("reports/data_docs/index.html")


def test_data_docs_are_built_for_a_failed_batch_too(lay, engine):
    write_raw(lay, columns())
    with pytest.raises(ValidationFailed):
        run_validate(config(data_docs=True, min_rows=1000), lay, now=NOW, engine=engine)
    index = lay.reports_dir / "data_docs" / "index.html"
    assert index.is_file()
    assert summary(lay)["outputs"]["data_docs"] == str(index)


def test_no_data_docs_when_disabled_only_a_placeholder(lay, engine):
    write_raw(lay, columns())
    run_validate(config(data_docs=True), lay, now=NOW, engine=engine)

    result = run_validate(config(data_docs=False), lay, now=NOW, engine=engine)

    assert result.data_docs_path is None
    assert summary(lay)["outputs"]["data_docs"] is None
    # dvc.yaml lists reports/data_docs as an output: it exists, and no earlier site lingers in it.
    site = lay.reports_dir / "data_docs"
    assert [p.name for p in site.iterdir()] == ["index.html"]
    assert "validate.data_docs is false" in (site / "index.html").read_text(encoding="utf-8")
    assert sorted(p.name for p in lay.reports_dir.iterdir()) == ["data_docs", "validation.json"]


# ---------------------------------------------------------------------------- the out-of-core engine on a GX sample


def test_duckdb_routes_rows_gx_never_saw_exactly_as_pandas(tmp_path, monkeypatch):
    """GX sees the first rows only (a sample); the SQL derived from its expectations routes the rest."""
    from pipeline.data.validation import outofcore

    monkeypatch.setattr(outofcore, "SAMPLE_ROWS", 10)
    cols = columns()
    cols["rating"][30] = math.nan
    _set(cols, "rating", [35], 9.0)
    _set(cols, "user_id", [25], None)
    _set(cols, "timestamp", [22], dt.datetime(1990, 1, 1, tzinfo=UTC))
    _copy_key_of_row_2(cols, [33, 38])
    _set(cols, "rating", [38], 7.0)  # a duplicate that breaks another rule first
    outputs = {}
    for engine in ("pandas", "duckdb"):
        lay = Layout(tmp_path / engine)
        write_raw(lay, cols)
        result = run_validate(config(), lay, now=NOW, engine=engine)
        outputs[engine] = (pq.read_table(lay.validated_interactions), pq.read_table(quarantine_path(lay)), result, summary(lay))
    (valid_p, quar_p, res_p, sum_p), (valid_d, quar_d, res_d, sum_d) = outputs["pandas"], outputs["duckdb"]
    assert valid_d.equals(valid_p)
    assert quar_d.schema == quar_p.schema and quar_d.to_pandas().equals(quar_p.to_pandas())  # NaN == NaN here
    assert res_d.quarantined_by_reason == res_p.quarantined_by_reason == {
        "null_user_id": 1, "timestamp_before_min": 1, "null_rating": 1, "rating_out_of_range": 2, "duplicate": 1}
    assert sum_d["rule_violations"] == sum_p["rule_violations"]
    assert sum_d["gx_sample"] == sum_d["gx_sample"] | {"rows": 10, "of": N, "whole_input": False}
    for check in ("range:rating", "unique:user_id,item_id,timestamp", "min_rows"):
        entry_d, entry_p = expectation(sum_d, check), expectation(sum_p, check)
        assert entry_d["success"] == entry_p["success"] and "GX saw" in entry_d["note"]
        assert entry_d["unexpected_count"] == entry_p["unexpected_count"]
        assert entry_d["partial_unexpected_rows"] == entry_p["partial_unexpected_rows"]


def test_duckdb_refuses_a_row_rule_it_cannot_derive(lay, monkeypatch):
    """A row rule without an SQL form stops the stage instead of going unchecked at scale."""
    from pipeline.data.validation import sql_rules

    write_raw(lay, columns())
    real_checks = rules.checks

    def with_a_regex_rule(*args):
        suite = real_checks(*args)
        (rating,) = [c for c in suite if c.name == "range:rating"]
        rating.expectation = rules.gx().expectations.ExpectColumnValuesToMatchRegex(column="source", regex="^row")
        return suite

    monkeypatch.setattr(rules, "checks", with_a_regex_rule)
    with pytest.raises(sql_rules.UnsupportedRule, match="no SQL form for ExpectColumnValuesToMatchRegex"):
        run_validate(config(), lay, now=NOW, engine="duckdb")


# ---------------------------------------------------------------------------- GX on the Spark DataFrame

# The conftest's marks for a Spark-only test (slow, skipped without Java/pyspark).
from tests.data.conftest import ON_SPARK  # noqa: E402


@pytest.mark.parametrize("_", [pytest.param(None, marks=ON_SPARK)], ids=["spark"])
def test_gx_on_spark_sees_every_row_and_quarantines_as_pandas(tmp_path, monkeypatch, spark, _):
    """SAMPLE_ROWS far below the input: GX's counts on Spark are still over all rows, routing is pandas's."""
    from pipeline.data.validation import outofcore

    monkeypatch.setattr(outofcore, "SAMPLE_ROWS", 10)
    cols = columns()
    cols["rating"][30] = math.nan  # GX on Spark counts a NaN as null, as on pandas
    _set(cols, "rating", [35], 9.0)
    _set(cols, "user_id", [25], None)
    _set(cols, "timestamp", [22], dt.datetime(1990, 1, 1, tzinfo=UTC))
    _copy_key_of_row_2(cols, [33, 38])
    _set(cols, "rating", [38], 7.0)
    outputs = {}
    for engine in ("pandas", "spark"):
        lay = Layout(tmp_path / engine)
        write_raw(lay, cols)
        result = run_validate(config(data_docs=True), lay, now=NOW, engine=engine)
        outputs[engine] = (pq.read_table(lay.validated_interactions), pq.read_table(quarantine_path(lay)), result, summary(lay))
    (valid_p, quar_p, res_p, sum_p), (valid_s, quar_s, res_s, sum_s) = outputs["pandas"], outputs["spark"]
    assert valid_s.equals(valid_p)
    assert quar_s.schema == quar_p.schema and quar_s.to_pandas().equals(quar_p.to_pandas())
    assert res_s.quarantined_by_reason == res_p.quarantined_by_reason
    assert sum_s["rule_violations"] == sum_p["rule_violations"]
    assert sum_s["gx_spark"]["rows"] == N and "min_rows" in sum_s["gx_spark"]["checks"]
    assert sum_s["gx_sample"]["rows"] == 10 and sum_s["gx_sample"]["checks"] == [f"type:{c}" for c in RAW_COLUMNS]
    for check in ("not_null:user_id", "not_null:rating", "min:timestamp", "range:rating", "unique:user_id,item_id,timestamp"):
        entry_s, entry_p = expectation(sum_s, check), expectation(sum_p, check)
        assert entry_s["gx_data"] == {"engine": "spark", "rows": N}
        assert "GX saw" not in entry_s.get("note", "")  # GX's own verdict, not the SQL's
        assert (entry_s["success"], entry_s["unexpected_count"]) == (entry_p["success"], entry_p["unexpected_count"])
        assert entry_s["partial_unexpected_rows"] == entry_p["partial_unexpected_rows"]
    assert expectation(sum_s, "range:rating")["element_count"] == N
    assert expectation(sum_s, "min_rows")["observed_value"] == N
    assert expectation(sum_s, "type:rating")["gx_data"] == {"engine": "pandas", "rows": 10}
    html = (tmp_path / "spark" / "reports" / "data_docs" / "index.html").read_text(encoding="utf-8")
    for suite_name in (rules.SUITE_TABLE, rules.SUITE_RANGES, f"{rules.SUITE_TABLE}_types_on_sample"):
        assert suite_name in html


@pytest.mark.parametrize("_", [pytest.param(None, marks=ON_SPARK)], ids=["spark"])
def test_gx_on_spark_decides_beyond_the_sample(tmp_path, monkeypatch, spark, _):
    """A row-count bound and an SQL rule drifting from GX, both visible only past the sample: GX on Spark catches each."""
    from pipeline.data.validation import outofcore, sql_rules

    monkeypatch.setattr(outofcore, "SAMPLE_ROWS", 10)
    lay = Layout(tmp_path / "work")
    cols = columns()
    _set(cols, "rating", [30], 9.0)
    write_raw(lay, cols)
    real_predicate = sql_rules.predicate
    monkeypatch.setattr(sql_rules, "predicate", lambda check, *a: "false" if check.name == "range:rating" else real_predicate(check, *a))
    with pytest.raises(RuntimeError, match="range:rating: GX counts 1 failing rows, the SQL derived from it 0"):
        run_validate(config(), lay, now=NOW, engine="spark")

    _tighten(monkeypatch, "min_rows", max_value=30)
    with pytest.raises(ValidationFailed, match=r"expect_table_row_count_to_be_between"):
        run_validate(config(), lay, now=NOW, engine="spark")
    entry = expectation(summary(lay), "min_rows")
    assert (entry["success"], entry["observed_value"], entry["gx_data"]) == (False, N, {"engine": "spark", "rows": N})
