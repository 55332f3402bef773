"""pipeline.data.sources.files: the formats users already have besides CSV and Parquet files.

SASRec/RecBole `user item` text files (the row order is the time), RecBole .inter atomic files,
gzip-compressed CSV, and directories of Parquet files; each with its bad inputs.
"""

from __future__ import annotations

import datetime as dt
import gzip

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.config import ColumnMapping, FeaturesConfig
from pipeline.core.errors import IngestError
from pipeline.core.io import write_parquet
from pipeline.data.features import run_features
from pipeline.data.sources import files, text
from pipeline.data.sources.convert import ROW_ORDER_EPOCH
from tests.data.sources.helpers import assert_accounts_for_every_row, file_config, quarantined, rows, utc, write

SASREC = ColumnMapping(user="0", item="1", timestamp=None)


def _sasrec_config(path, sep=" ", **overrides):
    return file_config(path, sep=sep, header=False, columns=SASREC, id_type="int", **overrides)


def _at(n: int) -> dt.datetime:
    return ROW_ORDER_EPOCH + dt.timedelta(seconds=n)


@pytest.mark.parametrize("sep", [" ", "\t"])
def test_sasrec_user_item_lines_get_the_line_order_as_time(tmp_path, sep):
    path = write(tmp_path / "ml-1m.txt", f"1{sep}10\n1{sep}11\n2{sep}10\n1{sep}12\n")

    result = files.read_file(_sasrec_config(path, sep=sep))

    assert rows(result.table) == [(1, 10, _at(0), 1.0), (1, 11, _at(1), 1.0), (2, 10, _at(2), 1.0), (1, 12, _at(3), 1.0)]
    assert result.details["timestamp_unit"] == "row_order"


def test_row_order_clock_runs_on_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(text, "CHUNK_BYTES", 8)  # a few lines per chunk
    path = write(tmp_path / "log.txt", "".join(f"{u} {i}\n" for u in (1, 2) for i in range(10, 16)))

    timestamps = files.read_file(_sasrec_config(path)).table["timestamp"].to_pylist()

    assert timestamps == [_at(n) for n in range(12)]


def test_sasrec_bad_lines_are_quarantined_and_the_clock_keeps_the_order(tmp_path):
    path = write(tmp_path / "log.txt", "1 10\n7\n1 x\n1 11 5\n1 12\n")

    result = files.read_file(_sasrec_config(path))

    assert quarantined(result) == [(2, "missing_fields"), (3, "non_numeric_item_id"), (4, "extra_fields")]
    assert_accounts_for_every_row(result, 5)
    kept = rows(result.table)
    assert [row[:2] for row in kept] == [(1, 10), (1, 12)]
    assert kept[0][2] < kept[1][2]


def test_empty_sasrec_file_is_an_error(tmp_path):
    with pytest.raises(IngestError, match=r"log\.txt is empty"):
        files.read_file(_sasrec_config(write(tmp_path / "log.txt", "")))
    with pytest.raises(IngestError, match=r"log\.txt: line 1 is blank; .* first data line must be line 1"):
        files.read_file(_sasrec_config(write(tmp_path / "log.txt", "\n\n")))


def test_line_order_is_what_leave_one_out_holds_out(tmp_path, layout):
    # A SASRec file: each user's lines in time order, users one after another.
    path = write(tmp_path / "log.txt", "1 10\n1 11\n1 12\n1 13\n2 13\n2 12\n2 11\n")
    table = files.read_file(_sasrec_config(path)).table
    write_parquet(table.to_pandas(), layout.validated_interactions)

    run_features(FeaturesConfig(min_rating=None, min_user_interactions=1, min_item_interactions=1), layout)

    inter = pd.read_parquet(layout.features_dir / "interactions.parquet")
    items = dict(zip(*pd.read_parquet(layout.features_dir / "item_vocab.parquet")[["index", "id"]].T.values))
    test_items = {int(items[i]) for i in inter.loc[inter["split"].astype(str) == "test", "item_idx"]}
    valid_items = {int(items[i]) for i in inter.loc[inter["split"].astype(str) == "valid", "item_idx"]}
    assert test_items == {13, 11}  # each user's last line
    assert valid_items == {12}  # and the line before it (user 2's is 12 too)


def test_recbole_inter_file_drops_the_field_types(tmp_path):
    path = write(tmp_path / "ml-100k.inter",
                 "user_id:token\titem_id:token\trating:float\ttimestamp:float\n196\t242\t3\t881250949\n")

    result = files.read_file(file_config(path, columns=ColumnMapping(rating="rating"), id_type="int"))

    assert result.details["format"] == "inter"
    assert rows(result.table) == [(196, 242, utc(881250949), 3.0)]


def test_gzipped_recbole_inter_file_is_read_as_inter(tmp_path):
    text = "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t881250949.0\n"
    path = write(tmp_path / "log.inter.gz", gzip.compress(text.encode()))

    result = files.read_file(file_config(path, id_type="int"))

    assert result.details["format"] == "inter" and rows(result.table) == [(1, 2, utc(881250949), 1.0)]


def test_recbole_inter_bad_lines_are_quarantined(tmp_path):
    path = write(tmp_path / "log.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\t2\tsoon\n1\n1\t3\t881250949\n")

    result = files.read_file(file_config(path))

    assert quarantined(result) == [(2, "non_numeric_timestamp"), (3, "missing_fields")]
    assert_accounts_for_every_row(result, 3)


def test_csv_gz_is_read_directly(tmp_path):
    text = "user_id,item_id,timestamp\n7,42,1700000000\n8,43,1700000060\n"
    path = write(tmp_path / "log.csv.gz", gzip.compress(text.encode()))

    result = files.read_file(file_config(path, id_type="int"))

    assert rows(result.table) == [(7, 42, utc(1700000000), 1.0), (8, 43, utc(1700000060), 1.0)]
    assert result.details["format"] == "csv" and result.details["gzip"] is True


def test_csv_gz_bad_lines_are_quarantined_by_line(tmp_path):
    text = "user_id,item_id,timestamp\n7,42,1700000000\n8\nbob,43,1700000060\n"
    path = write(tmp_path / "log.csv.gz", gzip.compress(text.encode()))

    result = files.read_file(file_config(path, id_type="int"))

    assert quarantined(result) == [(3, "missing_fields"), (4, "non_numeric_user_id")]
    assert_accounts_for_every_row(result, 3)


def test_empty_and_cut_off_gzip_are_errors(tmp_path):
    with pytest.raises(IngestError, match=r"log\.csv\.gz is empty"):
        files.read_file(file_config(write(tmp_path / "log.csv.gz", gzip.compress(b""))))
    whole = gzip.compress(("user_id,item_id,timestamp\n" + "7,42,1700000000\n" * 1000).encode())
    with pytest.raises(IngestError, match=r"cut\.csv\.gz cannot be decompressed"):
        files.read_file(file_config(write(tmp_path / "cut.csv.gz", whole[: len(whole) // 2])))


def test_gzip_parquet_and_zip_are_refused(tmp_path):
    path = write(tmp_path / "log.parquet.gz", gzip.compress(b"PAR1"))
    with pytest.raises(IngestError, match="compressed archive"):
        files.read_file(file_config(path, format="parquet"))
    with pytest.raises(IngestError, match=r"compressed archive \(zip\)"):
        files.read_file(file_config(write(tmp_path / "log.zip", b"PK\x03\x04rest")))


def _part(path, users, items, timestamps=None):
    columns = {"user_id": users, "item_id": items, "timestamp": timestamps or [1700000000] * len(users)}
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns, schema=pa.schema([("user_id", pa.string()), ("item_id", pa.string()),
                                                        ("timestamp", pa.int64())])) if not users else pa.table(columns),
                   path)


def test_parquet_directory_is_read_in_sorted_path_order(tmp_path):
    dataset = tmp_path / "events"
    _part(dataset / "part-1.parquet", ["3"], ["c"])
    _part(dataset / "part-0.parquet", ["1", "2"], ["a", "b"])
    _part(dataset / "_temporary" / "part-9.parquet", ["9"], ["z"])  # a writer's leftovers are not data
    write(dataset / "_SUCCESS", "")

    result = files.read_file(file_config(dataset))

    assert [row[:2] for row in rows(result.table)] == [("1", "a"), ("2", "b"), ("3", "c")]
    assert result.details["parquet_files"] == 2 and result.details["format"] == "parquet"


def test_parquet_directory_quarantines_by_row_index_across_files(tmp_path):
    dataset = tmp_path / "events"
    _part(dataset / "a.parquet", ["1", "2"], [10, 11])
    _part(dataset / "b.parquet", ["bob", "4"], [12, 13])

    result = files.read_file(file_config(dataset, id_type="int"))

    assert quarantined(result) == [(2, "non_numeric_user_id")]  # 0-based over the directory
    assert_accounts_for_every_row(result, 4)


def test_parquet_directory_without_row_order_timestamps_counts_across_files(tmp_path):
    dataset = tmp_path / "events"
    _part(dataset / "a.parquet", ["1"], ["x"])
    _part(dataset / "b.parquet", ["1"], ["y"])

    result = files.read_file(file_config(dataset, columns=ColumnMapping(timestamp=None)))

    assert result.table["timestamp"].to_pylist() == [_at(0), _at(1)]


def test_parquet_directory_errors_name_the_file(tmp_path):
    with pytest.raises(IngestError, match="no Parquet files"):
        files.read_file(file_config((tmp_path / "empty").mkdir() or tmp_path / "empty"))
    dataset = tmp_path / "events"
    _part(dataset / "a.parquet", ["1"], ["x"])
    pq.write_table(pa.table({"user": ["1"], "item_id": ["y"], "timestamp": [1]}), dataset / "b.parquet")
    with pytest.raises(IngestError, match=r"b\.parquet: column\(s\) \['user_id'\]"):
        files.read_file(file_config(dataset))
    with pytest.raises(IngestError, match="is a directory"):
        files.read_file(file_config(dataset, format="csv"))
    _part(tmp_path / "no_rows" / "a.parquet", [], [])
    with pytest.raises(IngestError, match=r"no_rows is empty: it holds no rows"):
        files.read_file(file_config(tmp_path / "no_rows"))
