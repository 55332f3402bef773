"""pipeline.data.sources.parse: typed parsing of ids and timestamps, and the rows it cannot parse."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.sources import files, parse
from tests.data.sources.helpers import UTC, file_config, quarantined, write


def test_parquet_float_ids_convert_and_nan_is_a_null_key(tmp_path):
    path = tmp_path / "events.parquet"
    pq.write_table(
        pa.table({"user_id": [1.0, float("nan"), 2.5], "item_id": [10, 11, 12], "timestamp": [1700000000] * 3}), path
    )

    result = files.read_file(file_config(path, id_type="int"))

    assert result.table["user_id"].to_pylist() == [1, None]
    assert quarantined(result) == [(2, "non_numeric_user_id")]


def test_same_events_in_ms_and_s_are_identical(tmp_path):
    millis = write(tmp_path / "ms.csv", "user_id,item_id,timestamp\n1,2,1433221332117\n1,3,1433224214000\n")
    seconds = write(tmp_path / "s.csv", "user_id,item_id,timestamp\n1,2,1433221332.117\n1,3,1433224214\n")

    from_millis = files.read_file(file_config(millis)).table["timestamp"]
    from_seconds = files.read_file(file_config(seconds)).table["timestamp"]

    assert from_millis.equals(from_seconds)
    assert from_millis[0].as_py() == dt.datetime(2015, 6, 2, 5, 2, 12, 117000, tzinfo=UTC)


@pytest.mark.parametrize(
    ("median", "unit"),
    [(9.9e10, "s"), (1.1e11, "ms"), (9.9e13, "ms"), (1.1e14, "us"), (9.9e16, "us"), (1.1e17, "ns")],
)
def test_timestamp_unit_thresholds(median, unit):
    assert parse.detect_timestamp_unit(pa.chunked_array([pa.array([median / 2, median, median * 1.001])])) == unit


def test_timestamp_overflowing_microseconds_is_quarantined(tmp_path):
    path = write(
        tmp_path / "log.csv", "user_id,item_id,timestamp\n1,2,1700000000\n1,3,99999999999999999\n1,4,1700000001\n"
    )

    result = files.read_file(file_config(path))

    assert result.table["item_id"].to_pylist() == ["2", "4"]
    assert quarantined(result) == [(3, "timestamp_out_of_range")]


def test_iso_datetimes_are_parsed_to_utc(tmp_path):
    path = write(
        tmp_path / "log.csv",
        "user_id,item_id,timestamp\n"
        "1,2,2024-03-01T12:00:00Z\n1,3,2024-03-01 14:00:00+02:00\n1,4,2024-03-01T12:00:00\n1,5,not a date\n",
    )

    result = files.read_file(file_config(path, timestamp_unit="datetime"))

    assert result.table["timestamp"].to_pylist() == [dt.datetime(2024, 3, 1, 12, tzinfo=UTC)] * 3
    assert quarantined(result) == [(5, "unparseable_datetime")]
