"""pipeline.data.sources.convert: rows to the raw schema (ids, ratings, events, the timestamp unit) and what is quarantined."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest

from pipeline.core.config import ColumnMapping
from pipeline.data.sources import files, movielens
from tests.data.sources.helpers import UTC, assert_accounts_for_every_row, file_config, ml_config, quarantined, rows, utc, write

EVENTS_CSV = (
    "ts,visitor,event,product,price\n"
    "1433221332117,257597,view,355908,9.5\n"
    "1433224214164,992329,addtocart,248676,1.0\n"
    "1433221999827,111016,transaction,318965,2.0\n"
)
EVENT_COLUMNS = ColumnMapping(user="visitor", item="product", timestamp="ts", event="event")
EPOCH_SECONDS = [1433221332, 1433224214, 1700000000]


def test_string_ids_are_kept_as_strings(tmp_path):
    path = write(tmp_path / "log.csv", "user_id,item_id,timestamp\nu-007,sku 42,1700000000\n0042,17,1700000001\n")

    result = files.read_file(file_config(path, id_type="str"))

    assert result.table.schema.field("user_id").type == pa.string()
    assert result.table["user_id"].to_pylist() == ["u-007", "0042"]  # leading zeros kept
    assert result.table["item_id"].to_pylist() == ["sku 42", "17"]


def test_event_weights_give_ratings_and_unknown_events_are_quarantined(tmp_path):
    path = write(tmp_path / "events.csv", EVENTS_CSV)
    weights = {"view": 1.0, "addtocart": 3.0}

    result = files.read_file(file_config(path, columns=EVENT_COLUMNS, id_type="int", event_weights=weights))

    assert rows(result.table) == [
        (257597, 355908, dt.datetime(2015, 6, 2, 5, 2, 12, 117000, tzinfo=UTC), 1.0),
        (992329, 248676, dt.datetime(2015, 6, 2, 5, 50, 14, 164000, tzinfo=UTC), 3.0),
    ]
    assert quarantined(result) == [(4, "unknown_event")]
    assert result.quarantine["raw"][0] == "1433221999827,111016,transaction,318965,2.0"
    assert_accounts_for_every_row(result, 3)


def test_without_rating_or_weights_every_event_counts_once(tmp_path):
    path = write(tmp_path / "events.csv", EVENTS_CSV)

    result = files.read_file(file_config(path, columns=EVENT_COLUMNS, id_type="int"))

    assert result.table["rating"].to_pylist() == [1.0, 1.0, 1.0]
    assert result.table.schema.field("rating").type == pa.float32()


def test_non_numeric_ids_are_quarantined_when_ids_are_int(tmp_path):
    path = write(
        tmp_path / "log.csv",
        "user_id,item_id,timestamp,rating\n"
        "1,10,1700000000,4\nalice,11,1700000001,4\n3,x12,1700000002,4\n4,13.0,1700000003,4\n",
    )

    result = files.read_file(file_config(path, id_type="int", columns=ColumnMapping(rating="rating")))

    assert rows(result.table) == [(1, 10, utc(1700000000), 4.0), (4, 13, utc(1700000003), 4.0)]
    assert quarantined(result) == [(3, "non_numeric_user_id"), (4, "non_numeric_item_id")]
    assert result.quarantine["raw"].tolist() == ["alice,11,1700000001,4", "3,x12,1700000002,4"]
    assert_accounts_for_every_row(result, 4)


def test_non_numeric_timestamp_and_rating_are_quarantined(tmp_path):
    ratings = write(tmp_path / "u.data", "1\t2\t3\t881250949\n1\t3\tgood\t881250949\n1\t4\t5\tyesterday\n")

    result = movielens.read_movielens(ml_config(ratings))

    assert result.table["item_id"].to_pylist() == [2]
    assert quarantined(result) == [(2, "non_numeric_rating"), (3, "non_numeric_timestamp")]


def test_empty_key_fields_pass_through_as_null(tmp_path):
    path = write(tmp_path / "log.csv", "user_id,item_id,timestamp\n,10,1700000000\n2,,1700000001\n3,12,\n")

    result = files.read_file(file_config(path, id_type="int"))

    assert result.quarantine.empty  # nulls are validate's to quarantine
    assert result.table["user_id"].to_pylist() == [None, 2, 3]
    assert result.table["item_id"].to_pylist() == [10, None, 12]
    assert result.table["timestamp"].to_pylist() == [utc(1700000000), utc(1700000001), None]


def test_empty_key_in_u_data_passes_through_as_null(tmp_path):
    result = movielens.read_movielens(ml_config(write(tmp_path / "u.data", "1\t\t3\t881250949\n")))

    assert rows(result.table) == [(1, None, utc(881250949), 3.0)]


def test_duplicated_rows_are_kept_for_validate(tmp_path):
    ratings = write(tmp_path / "u.data", "1\t2\t3\t881250949\n" * 3)

    result = movielens.read_movielens(ml_config(ratings))

    assert rows(result.table) == [(1, 2, utc(881250949), 3.0)] * 3


@pytest.mark.parametrize(("unit", "scale"), [("s", 1), ("ms", 10**3), ("us", 10**6), ("ns", 10**9)])
def test_timestamp_unit_is_detected_and_units_give_identical_timestamps(tmp_path, unit, scale):
    lines = "".join(f"1,{i},{seconds * scale}\n" for i, seconds in enumerate(EPOCH_SECONDS))
    path = write(tmp_path / f"log_{unit}.csv", "user_id,item_id,timestamp\n" + lines)

    result = files.read_file(file_config(path))

    assert result.table["timestamp"].to_pylist() == [utc(s) for s in EPOCH_SECONDS]
    assert result.details["timestamp_unit"] == unit
    assert result.details["timestamp_unit_detected"] is True


def test_configured_unit_overrides_detection(tmp_path):
    path = write(tmp_path / "log.csv", "user_id,item_id,timestamp\n1,2,1433221332117\n")

    result = files.read_file(file_config(path, timestamp_unit="ms"))

    assert result.table["timestamp"].to_pylist() == [dt.datetime(2015, 6, 2, 5, 2, 12, 117000, tzinfo=UTC)]
    assert result.details["timestamp_unit_detected"] is False


def test_iso_datetimes_are_detected_in_auto_mode(tmp_path):
    path = write(tmp_path / "log.csv", "user_id,item_id,timestamp\n1,2,2024-03-01T12:00:00Z\n")

    result = files.read_file(file_config(path))

    assert result.table["timestamp"].to_pylist() == [dt.datetime(2024, 3, 1, 12, tzinfo=UTC)]
    assert result.details["timestamp_unit"] == "datetime"
