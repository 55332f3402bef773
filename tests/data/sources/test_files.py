"""pipeline.data.sources.files: any CSV/Parquet file, its column mapping, and files that cannot be read."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core import schema
from pipeline.core.config import ColumnMapping
from pipeline.core.errors import IngestError
from pipeline.data.sources import files
from tests.data.sources.helpers import UTC, assert_accounts_for_every_row, file_config, quarantined, rows, utc, write


def test_csv_with_column_mapping(tmp_path):
    path = write(tmp_path / "ratings.csv", "when,who,what,stars\n1700000000,7,42,4.5\n1700000060,8,43,2\n")
    columns = ColumnMapping(user="who", item="what", timestamp="when", rating="stars")

    result = files.read_file(file_config(path, columns=columns, id_type="int"))

    assert result.table.schema == schema.raw_schema(pa.int64())
    assert rows(result.table) == [(7, 42, utc(1700000000), 4.5), (8, 43, utc(1700000060), 2.0)]
    assert result.table["source"].to_pylist() == ["file:ratings.csv"] * 2
    assert result.details["format"] == "csv"


def test_csv_without_header_maps_columns_by_position(tmp_path):
    path = write(tmp_path / "log.tsv", "7\t42\t1700000000\n")
    columns = ColumnMapping(user="0", item="1", timestamp="2")

    result = files.read_file(file_config(path, sep="\t", header=False, columns=columns, id_type="int"))

    assert rows(result.table) == [(7, 42, utc(1700000000), 1.0)]


def test_parquet_with_column_mapping_and_native_timestamps(tmp_path):
    path = tmp_path / "events.parquet"
    pq.write_table(
        pa.table(
            {
                "customer": pa.array([5, 6], pa.int32()),
                "sku": ["A-1", "B-2"],
                "at": pa.array([dt.datetime(2024, 1, 2, 3, 4, 5), dt.datetime(2024, 1, 3)], pa.timestamp("ns")),
                "score": pa.array([4.0, 1.5], pa.float64()),
            }
        ),
        path,
    )
    columns = ColumnMapping(user="customer", item="sku", timestamp="at", rating="score")

    result = files.read_file(file_config(path, columns=columns, id_type="str"))

    assert result.table.schema == schema.raw_schema(pa.string())
    assert rows(result.table) == [
        ("5", "A-1", dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), 4.0),
        ("6", "B-2", dt.datetime(2024, 1, 3, tzinfo=UTC), 1.5),
    ]
    assert result.details["format"] == "parquet"


def test_parquet_non_numeric_id_is_quarantined_by_row_index(tmp_path):
    path = tmp_path / "events.parquet"
    pq.write_table(
        pa.table({"user_id": ["1", "bob", "3"], "item_id": [10, 11, 12], "timestamp": [1700000000] * 3}), path
    )

    result = files.read_file(file_config(path, id_type="int"))

    assert result.table["user_id"].to_pylist() == [1, 3]
    assert quarantined(result) == [(1, "non_numeric_user_id")]  # 0-based row index
    assert '"bob"' in result.quarantine["raw"][0]
    assert_accounts_for_every_row(result, 3)


def test_event_weights_without_event_column_is_an_error(tmp_path):
    path = write(tmp_path / "log.csv", "user_id,item_id,timestamp\n1,2,1700000000\n")

    with pytest.raises(IngestError, match="columns.event"):
        files.read_file(file_config(path, event_weights={"view": 1.0}))


def test_empty_file_is_an_error(tmp_path):
    with pytest.raises(IngestError, match=r"log\.csv is empty"):
        files.read_file(file_config(write(tmp_path / "log.csv", b"")))


def test_header_only_file_is_an_error(tmp_path):
    path = write(tmp_path / "log.csv", "user_id,item_id,timestamp\n")

    with pytest.raises(IngestError, match=r"log\.csv is empty: it holds only the header line"):
        files.read_file(file_config(path))


def test_empty_parquet_is_an_error(tmp_path):
    path = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user_id": pa.array([], pa.int64()), "item_id": pa.array([], pa.int64()),
                             "timestamp": pa.array([], pa.int64())}), path)

    with pytest.raises(IngestError, match=r"log\.parquet is empty"):
        files.read_file(file_config(path))


def test_missing_columns_are_named_with_the_columns_found(tmp_path):
    path = write(tmp_path / "log.csv", "user,item_id,time\n1,2,1700000000\n")

    with pytest.raises(IngestError) as error:
        files.read_file(file_config(path))

    message = str(error.value)
    assert "['user_id', 'timestamp']" in message  # missing
    assert "['user', 'item_id', 'time']" in message  # found


def test_wrong_separator_is_named(tmp_path):
    path = write(tmp_path / "log.csv", "user_id;item_id;timestamp\n1;2;1700000000\n")

    with pytest.raises(IngestError, match=r"single column with sep=',': the separator is probably wrong"):
        files.read_file(file_config(path))
