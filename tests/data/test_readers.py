"""pipeline.data.sources readers: MovieLens formats, any CSV/Parquet file, and every kind of bad input.

Each test writes its own tiny files in the official formats into tmp_path.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import io
import threading
import typing
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.core import schema
from pipeline.core.config import ColumnMapping, FileConfig, MovieLensConfig
from pipeline.core.errors import IngestError
from pipeline.data.sources import convert, download, files, movielens, parse, text

UTC = dt.timezone.utc
REAL_ML_100K = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "ml-100k"

U_DATA = "196\t242\t3\t881250949\n186\t302\t3\t891717742\n22\t377\t1\t878887116\n"
RATINGS_DAT = "1::1193::5::978300760\n1::661::3::978302109\n2::1357::5::978298709\n"
RATINGS_CSV = "userId,movieId,rating,timestamp\n1,296,5.0,1147880044\n1,306,3.5,1147868817\n2,307,5.0,1147868828\n"


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def ml_config(path: Path, **overrides) -> MovieLensConfig:
    return MovieLensConfig(path=str(path), **overrides)


def file_config(path: Path, **overrides) -> FileConfig:
    return FileConfig(path=str(path), **overrides)


def utc(seconds: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, tz=UTC)


def rows(table: pa.Table) -> list[tuple]:
    return list(zip(*(table[name].to_pylist() for name in schema.RAW_COLUMNS[:4])))


def quarantined(result: convert.ReadResult) -> list[tuple[int, str]]:
    return list(zip(result.quarantine["line"].tolist(), result.quarantine["reason"].tolist()))


def assert_accounts_for_every_row(result: convert.ReadResult, data_lines: int) -> None:
    assert result.details["rows_read"] == result.table.num_rows + len(result.quarantine) == data_lines


# --------------------------------------------------------------------------- MovieLens formats


def test_ml_100k_u_data_values(tmp_path):
    result = movielens.read_movielens(ml_config(write(tmp_path / "ml-100k" / "u.data", U_DATA).parent))

    assert result.table.schema == schema.raw_schema(pa.int64())
    assert rows(result.table) == [
        (196, 242, utc(881250949), 3.0),
        (186, 302, utc(891717742), 3.0),
        (22, 377, utc(878887116), 1.0),
    ]
    assert set(result.table["source"].to_pylist()) == {"movielens:ml-100k"}
    assert result.details["format"] == "u.data"
    assert result.quarantine.empty
    assert_accounts_for_every_row(result, 3)


def test_ml_1m_ratings_dat_values(tmp_path):
    result = movielens.read_movielens(ml_config(write(tmp_path / "ml-1m" / "ratings.dat", RATINGS_DAT).parent))

    assert rows(result.table) == [
        (1, 1193, utc(978300760), 5.0),
        (1, 661, utc(978302109), 3.0),
        (2, 1357, utc(978298709), 5.0),
    ]
    assert set(result.table["source"].to_pylist()) == {"movielens:ml-1m"}
    assert result.details["format"] == "ratings.dat"


def test_ml_10m_found_in_archive_subfolder_with_half_stars(tmp_path):
    # ml-10m.zip unpacks into ml-10M100K/; ML-10M has half-star ratings.
    write(tmp_path / "ml-10m" / "ml-10M100K" / "ratings.dat", "1::122::2.5::838985046\n")

    result = movielens.read_movielens(ml_config(tmp_path / "ml-10m"))

    assert rows(result.table) == [(1, 122, utc(838985046), 2.5)]
    assert result.table["source"].to_pylist() == ["movielens:ml-10m"]


def test_ml_20m_ratings_csv_values(tmp_path):
    result = movielens.read_movielens(ml_config(write(tmp_path / "ml-20m" / "ratings.csv", RATINGS_CSV).parent))

    assert rows(result.table) == [
        (1, 296, utc(1147880044), 5.0),
        (1, 306, utc(1147868817), 3.5),
        (2, 307, utc(1147868828), 5.0),
    ]
    assert set(result.table["source"].to_pylist()) == {"movielens:ml-20m"}
    assert_accounts_for_every_row(result, 3)  # the header is not a data line


def test_directory_and_file_path_give_the_same_table(tmp_path):
    ratings = write(tmp_path / "ml-1m" / "ratings.dat", RATINGS_DAT)

    from_directory = movielens.read_movielens(ml_config(ratings.parent))
    from_file = movielens.read_movielens(ml_config(ratings))

    assert from_directory.table.equals(from_file.table)
    assert from_file.details["path"] == str(ratings)


def test_format_of_a_renamed_file_is_sniffed_from_its_first_line(tmp_path):
    renamed = write(tmp_path / "export.txt", RATINGS_DAT)

    result = movielens.read_movielens(ml_config(renamed))

    assert result.details["format"] == "ratings.dat"
    assert result.table["item_id"].to_pylist() == [1193, 661, 1357]


def test_variant_must_match_the_file_found(tmp_path):
    write(tmp_path / "data" / "u.data", U_DATA)

    with pytest.raises(IngestError, match=r"ratings\.dat"):
        movielens.read_movielens(ml_config(tmp_path / "data", variant="ml-1m"))


def test_u_data_written_with_commas_is_a_clear_error(tmp_path):
    comma_separated = write(tmp_path / "ml-100k" / "u.data", U_DATA.replace("\t", ","))

    with pytest.raises(IngestError) as error:
        movielens.read_movielens(ml_config(comma_separated.parent))

    message = str(error.value)
    assert "tab-separated" in message  # what was expected
    assert "'196,242,3,881250949'" in message and "4 comma-separated fields" in message  # what was found


def test_unrecognised_file_names_the_expected_formats(tmp_path):
    semicolons = write(tmp_path / "mine.txt", "1;2;3;4\n")

    expected = r"not a MovieLens ratings file.*u\.data.*ratings\.dat.*ratings\.csv.*semicolon"
    with pytest.raises(IngestError, match=expected):
        movielens.read_movielens(ml_config(semicolons))


def test_directory_without_ratings_file(tmp_path):
    write(tmp_path / "ml-100k" / "u.item", "1|Toy Story (1995)\n")

    with pytest.raises(IngestError, match=r"no MovieLens ratings file in .*u\.data"):
        movielens.read_movielens(ml_config(tmp_path / "ml-100k"))


def test_missing_movielens_path_suggests_download(tmp_path):
    with pytest.raises(IngestError, match="download"):
        movielens.read_movielens(ml_config(tmp_path / "absent"))


def test_empty_u_data_is_an_error(tmp_path):
    with pytest.raises(IngestError, match=r"u\.data is empty"):
        movielens.read_movielens(ml_config(write(tmp_path / "u.data", b"")))


def test_header_only_ratings_csv_is_an_error(tmp_path):
    header_only = write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n")

    with pytest.raises(IngestError, match=r"ratings\.csv is empty: it holds only the header"):
        movielens.read_movielens(ml_config(header_only))


def test_ratings_dat_with_a_single_colon_is_quarantined(tmp_path):
    # "1:9::5::978300760" splits into the right number of ':' fields, but a
    # filler between two '::' is not empty: the line is malformed.
    ratings = write(tmp_path / "ratings.dat", "1::10::5::978300760\n1:9::5::978300760::\n2:x:3::4::978300760\n")

    result = movielens.read_movielens(ml_config(ratings))

    assert rows(result.table) == [(1, 10, utc(978300760), 5.0)]
    assert quarantined(result) == [(2, "extra_fields"), (3, "malformed_separator")]
    assert result.quarantine["raw"].tolist() == ["1:9::5::978300760::", "2:x:3::4::978300760"]


def test_lines_after_a_malformed_one_keep_their_line_numbers(tmp_path):
    ratings = write(
        tmp_path / "ratings.dat", "1::9::5::978300760\n2:x:3::4::978300760\n1::10::5::978300760\n1::11::5::soon\n"
    )

    result = movielens.read_movielens(ml_config(ratings))

    assert quarantined(result) == [(2, "malformed_separator"), (4, "non_numeric_timestamp")]
    assert result.quarantine["raw"][1] == "1::11::5::soon"
    assert result.table["item_id"].to_pylist() == [9, 10]


def test_download_variants_are_the_formats_variants_and_the_configs():
    # download owns the list (movielens imports it); the formats and the config's choices must name the same archives.
    from_formats = tuple(variant for fmt in movielens.MOVIELENS_FORMATS for variant in fmt.variants)
    from_config = typing.get_args(MovieLensConfig.model_fields["variant"].annotation)

    assert download.MOVIELENS_VARIANTS == from_formats
    assert ("auto", *download.MOVIELENS_VARIANTS) == from_config


# --------------------------------------------------------------------------- download


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        pass


@contextlib.contextmanager
def serve(directory: Path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/datasets/movielens"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def publish_ml_100k(site: Path, *, published_md5: str | None = None) -> str:
    """A tiny ml-100k.zip (top folder ml-100k/, like the real one) and its .md5 beside it."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        bundle.writestr("ml-100k/u.data", U_DATA)
        bundle.writestr("ml-100k/README", "tiny test copy\n")
    archive = buffer.getvalue()
    folder = site / "datasets" / "movielens"
    write(folder / "ml-100k.zip", archive)
    real_md5 = hashlib.md5(archive).hexdigest()
    # The BSD format GroupLens publishes: "MD5 (ml-100k.zip) = <hash>".
    write(folder / "ml-100k.zip.md5", f"MD5 (ml-100k.zip) = {published_md5 or real_md5}\n")
    return real_md5


@pytest.fixture
def no_proxy(monkeypatch):
    # A proxy from the environment must not intercept the local test server.
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.timeout(30)
def test_download_verifies_checksum_and_extracts_atomically(tmp_path, no_proxy):
    publish_ml_100k(tmp_path / "site")
    target = tmp_path / "data" / "ml-100k"

    with serve(tmp_path / "site") as base_url:
        result = movielens.read_movielens(ml_config(target, download=True, base_url=base_url))

    assert sorted(p.name for p in target.iterdir()) == ["README", "u.data"]
    assert (target / "u.data").read_text() == U_DATA
    assert [p.name for p in target.parent.iterdir()] == ["ml-100k"]  # no staging left behind
    assert result.table["user_id"].to_pylist() == [196, 186, 22]


@pytest.mark.timeout(30)
def test_download_with_bad_checksum_leaves_nothing(tmp_path, no_proxy):
    publish_ml_100k(tmp_path / "site", published_md5="0" * 32)
    target = tmp_path / "data" / "ml-100k"

    with serve(tmp_path / "site") as base_url, pytest.raises(IngestError, match="checksum mismatch"):
        download.download_movielens("ml-100k", target, base_url, timeout_s=10)

    assert not target.exists()
    assert list(target.parent.iterdir()) == []


@pytest.mark.timeout(30)
def test_download_of_unpublished_variant_is_a_clear_error(tmp_path, no_proxy):
    publish_ml_100k(tmp_path / "site")

    with serve(tmp_path / "site") as base_url, pytest.raises(IngestError, match=r"cannot download .*ml-1m\.zip\.md5"):
        download.download_movielens("ml-1m", tmp_path / "data" / "ml-1m", base_url, timeout_s=10)


def test_present_data_is_not_downloaded_again(tmp_path):
    ratings = write(tmp_path / "ml-100k" / "u.data", U_DATA)

    # An unreachable base_url proves no request is made.
    result = movielens.read_movielens(ml_config(ratings.parent, download=True, base_url="http://127.0.0.1:9"))

    assert result.table.num_rows == 3


# --------------------------------------------------------------------------- any CSV / Parquet file

EVENTS_CSV = (
    "ts,visitor,event,product,price\n"
    "1433221332117,257597,view,355908,9.5\n"
    "1433224214164,992329,addtocart,248676,1.0\n"
    "1433221999827,111016,transaction,318965,2.0\n"
)
EVENT_COLUMNS = ColumnMapping(user="visitor", item="product", timestamp="ts", event="event")


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


def test_parquet_float_ids_convert_and_nan_is_a_null_key(tmp_path):
    path = tmp_path / "events.parquet"
    pq.write_table(
        pa.table({"user_id": [1.0, float("nan"), 2.5], "item_id": [10, 11, 12], "timestamp": [1700000000] * 3}), path
    )

    result = files.read_file(file_config(path, id_type="int"))

    assert result.table["user_id"].to_pylist() == [1, None]
    assert quarantined(result) == [(2, "non_numeric_user_id")]


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


def test_event_weights_without_event_column_is_an_error(tmp_path):
    path = write(tmp_path / "log.csv", "user_id,item_id,timestamp\n1,2,1700000000\n")

    with pytest.raises(IngestError, match="columns.event"):
        files.read_file(file_config(path, event_weights={"view": 1.0}))


# --------------------------------------------------------------------------- bad input


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


def test_undecodable_bytes_quarantine_only_their_line(tmp_path):
    content = U_DATA.encode() + b"7\t8\xff\xfe\t4\t881250949\n" + b"9\t10\t5\t881250950\n"
    ratings = write(tmp_path / "u.data", content)

    result = movielens.read_movielens(ml_config(ratings))

    assert result.table["user_id"].to_pylist() == [196, 186, 22, 9]
    assert quarantined(result) == [(4, "invalid_utf8")]
    assert result.quarantine["raw"][0] == repr(b"7\t8\xff\xfe\t4\t881250949")  # lossless
    assert_accounts_for_every_row(result, 5)


def test_undecodable_first_line_does_not_fail_format_detection(tmp_path):
    ratings = write(tmp_path / "u.data", b"1\t\xe9\t3\t881250949\n" + U_DATA.encode())

    result = movielens.read_movielens(ml_config(ratings))

    assert quarantined(result) == [(1, "invalid_utf8")]
    assert result.table.num_rows == 3


def test_truncated_last_line_is_quarantined(tmp_path):
    ratings = write(tmp_path / "u.data", U_DATA + "5\t6")  # cut off mid-line, no newline

    result = movielens.read_movielens(ml_config(ratings))

    assert result.table.num_rows == 3
    assert quarantined(result) == [(4, "missing_fields")]
    assert result.quarantine["raw"][0] == "5\t6"
    assert_accounts_for_every_row(result, 4)


def test_extra_fields_are_quarantined(tmp_path):
    path = write(
        tmp_path / "log.csv", "user_id,item_id,timestamp\n1,2,1700000000\n3,4,1700000001,oops\n5,6,1700000002\n"
    )

    result = files.read_file(file_config(path, id_type="int"))

    assert result.table["user_id"].to_pylist() == [1, 5]
    assert quarantined(result) == [(3, "extra_fields")]
    assert result.quarantine["raw"][0] == "3,4,1700000001,oops"


def test_duplicated_rows_are_kept_for_validate(tmp_path):
    ratings = write(tmp_path / "u.data", "1\t2\t3\t881250949\n" * 3)

    result = movielens.read_movielens(ml_config(ratings))

    assert rows(result.table) == [(1, 2, utc(881250949), 3.0)] * 3


def test_unbalanced_quote_does_not_swallow_the_following_lines(tmp_path):
    path = write(tmp_path / "log.csv", 'user_id,item_id,timestamp\n1,"2,1700000000\n3,4,1700000001\n5,6,1700000002\n')

    result = files.read_file(file_config(path, id_type="int"))

    assert result.table["user_id"].to_pylist() == [3, 5]
    assert quarantined(result) == [(2, "non_numeric_item_id")]
    assert_accounts_for_every_row(result, 3)


def test_quoted_fields_are_unquoted(tmp_path):
    path = write(tmp_path / "log.csv", 'user_id,item_id,timestamp\n"a,b","say ""hi""",1700000000\n')

    result = files.read_file(file_config(path))

    assert result.table["user_id"].to_pylist() == ["a,b"]
    assert result.table["item_id"].to_pylist() == ['say "hi"']


def test_blank_lines_are_skipped_and_line_numbers_stay_right(tmp_path):
    ratings = write(tmp_path / "u.data", "1\t2\t3\t881250949\r\n\r\n\n1\t3\t3\tx\r\n")

    result = movielens.read_movielens(ml_config(ratings))

    assert quarantined(result) == [(4, "non_numeric_timestamp")]
    assert result.quarantine["raw"][0] == "1\t3\t3\tx"
    assert result.details["blank_lines"] == 2
    assert_accounts_for_every_row(result, 2)


# --------------------------------------------------------------------------- timestamps

EPOCH_SECONDS = [1433221332, 1433224214, 1700000000]


@pytest.mark.parametrize(("unit", "scale"), [("s", 1), ("ms", 10**3), ("us", 10**6), ("ns", 10**9)])
def test_timestamp_unit_is_detected_and_units_give_identical_timestamps(tmp_path, unit, scale):
    lines = "".join(f"1,{i},{seconds * scale}\n" for i, seconds in enumerate(EPOCH_SECONDS))
    path = write(tmp_path / f"log_{unit}.csv", "user_id,item_id,timestamp\n" + lines)

    result = files.read_file(file_config(path))

    assert result.table["timestamp"].to_pylist() == [utc(s) for s in EPOCH_SECONDS]
    assert result.details["timestamp_unit"] == unit
    assert result.details["timestamp_unit_detected"] is True


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


def test_configured_unit_overrides_detection(tmp_path):
    path = write(tmp_path / "log.csv", "user_id,item_id,timestamp\n1,2,1433221332117\n")

    result = files.read_file(file_config(path, timestamp_unit="ms"))

    assert result.table["timestamp"].to_pylist() == [dt.datetime(2015, 6, 2, 5, 2, 12, 117000, tzinfo=UTC)]
    assert result.details["timestamp_unit_detected"] is False


def test_iso_datetimes_are_parsed_to_utc(tmp_path):
    path = write(
        tmp_path / "log.csv",
        "user_id,item_id,timestamp\n"
        "1,2,2024-03-01T12:00:00Z\n1,3,2024-03-01 14:00:00+02:00\n1,4,2024-03-01T12:00:00\n1,5,not a date\n",
    )

    result = files.read_file(file_config(path, timestamp_unit="datetime"))

    assert result.table["timestamp"].to_pylist() == [dt.datetime(2024, 3, 1, 12, tzinfo=UTC)] * 3
    assert quarantined(result) == [(5, "unparseable_datetime")]


def test_iso_datetimes_are_detected_in_auto_mode(tmp_path):
    path = write(tmp_path / "log.csv", "user_id,item_id,timestamp\n1,2,2024-03-01T12:00:00Z\n")

    result = files.read_file(file_config(path))

    assert result.table["timestamp"].to_pylist() == [dt.datetime(2024, 3, 1, 12, tzinfo=UTC)]
    assert result.details["timestamp_unit"] == "datetime"


# --------------------------------------------------------------------------- chunking and scale


def test_small_chunks_give_the_same_result_and_line_numbers(tmp_path, monkeypatch):
    lines = [f"{u}\t{u % 7}\t{u % 5 + 1}\t{881250949 + u}" for u in range(1, 301)]
    lines[40] = "41\tx\t3\t881250990"  # non-numeric item
    lines[99] = "100\t1\t2\t881251049\textra"  # extra field
    lines[199] = "200\t1"  # missing fields
    content = ("\n".join(lines) + "\n").encode()
    content = content.replace(b"250\t5\t1", b"250\t\xff\t1")  # undecodable
    ratings = write(tmp_path / "u.data", content)

    whole = movielens.read_movielens(ml_config(ratings))
    monkeypatch.setattr(text, "CHUNK_BYTES", 100)  # ~4 lines a chunk, cutting lines across reads
    chunked = movielens.read_movielens(ml_config(ratings))

    expected = [(41, "non_numeric_item_id"), (100, "extra_fields"), (200, "missing_fields"), (250, "invalid_utf8")]
    assert quarantined(whole) == quarantined(chunked) == expected
    assert whole.quarantine.equals(chunked.quarantine)
    assert whole.table.equals(chunked.table)
    assert_accounts_for_every_row(chunked, 300)


def test_line_longer_than_arrow_block_is_still_parsed(tmp_path, monkeypatch):
    monkeypatch.setattr(text, "ARROW_BLOCK_BYTES", 16)
    ratings = write(tmp_path / "u.data", U_DATA + "1\t2\t3\t4" + "\t5" * 50 + "\n")

    result = movielens.read_movielens(ml_config(ratings))

    assert result.table.num_rows == 3
    assert quarantined(result) == [(4, "extra_fields")]


@pytest.mark.skipif(not (REAL_ML_100K / "u.data").is_file(), reason=f"real MovieLens 100K not found at {REAL_ML_100K}")
def test_real_ml_100k_loads_completely():
    result = movielens.read_movielens(ml_config(REAL_ML_100K))

    assert result.table.num_rows == 100_000
    assert pc.count_distinct(result.table["user_id"]).as_py() == 943
    assert pc.count_distinct(result.table["item_id"]).as_py() == 1682
    assert result.quarantine.empty
    assert pc.min(result.table["rating"]).as_py() == 1.0 and pc.max(result.table["rating"]).as_py() == 5.0
    assert isinstance(result.quarantine, pd.DataFrame)
