"""Property-based fuzzing of the readers (files, movielens, text, convert, parse) and of what their errors quote.

Any generated file ends in every data line accounted for exactly (rows read = rows loaded + rows
quarantined, and rows read = the data lines of the file) or in an IngestError; never another
exception. No reader or download error quotes more than a short token of what a file holds.
"""

from __future__ import annotations

import datetime as dt
import tempfile
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.config import ColumnMapping
from pipeline.core.errors import IngestError
from pipeline.data.sources import download, files, movielens, parse, text
from tests.data.sources.helpers import file_config, ml_config

FUZZ = settings(max_examples=80, deadline=None, database=None)
SEPARATORS = [",", "\t", ";", "|", "::"]


@contextmanager
def _workdir():
    with tempfile.TemporaryDirectory(prefix="leanrec-fuzz-") as name:
        yield Path(name)


def _data_lines(content: bytes, header: bool) -> int:
    """Lines that are records: not blank (empty, or a lone CR), the header line excluded."""
    content = content.removeprefix(b"\xef\xbb\xbf")
    lines = content.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if header:
        lines = lines[1:]
    return sum(1 for line in lines if line not in (b"", b"\r"))


def _accounted(result, content: bytes, header: bool) -> None:
    details = result.details
    assert details["rows_read"] == result.table.num_rows + len(result.quarantine) == _data_lines(content, header)
    assert details["rows_quarantined"] == sum(details["quarantined_by_reason"].values())
    if len(result.quarantine):
        assert result.quarantine["line"].is_unique  # one reason per line
        assert result.quarantine["line"].min() >= (2 if header else 1)


# --------------------------------------------------------------------------- delimited text

ids = st.one_of(st.integers(-5, 10**6), st.integers(-(2**70), 2**70)).map(str)
numbers = st.one_of(ids, st.floats(allow_nan=True, allow_infinity=True).map(repr),
                    st.sampled_from(["1e5", ".5", "+3", " 7 ", "0x1f", "nan", "-inf", "1_000"]))
junk = st.text(alphabet='ab,;|:\t "\'\r\\é\u2028', max_size=8)  # delimiters, quotes, a CR, non-ASCII
fields = st.one_of(ids, numbers, junk, st.just(""))
lines = st.lists(fields, min_size=0, max_size=6)


@st.composite
def delimited_files(draw):
    separator = draw(st.sampled_from(SEPARATORS))
    header = draw(st.booleans())
    quote = len(separator) == 1 and draw(st.booleans())
    body = []
    for fields_ in draw(st.lists(lines, max_size=25)):
        if quote:
            fields_ = [f'"{f.replace(chr(34), chr(34) * 2)}"' if draw(st.booleans()) else f for f in fields_]
        body.append(separator.join(fields_).encode())
    for _ in range(draw(st.integers(0, 2))):  # a line that is not UTF-8 (Latin-1 bytes)
        body.insert(draw(st.integers(0, len(body))), "caf\u00e9".encode("latin-1"))
    names = ["user", "item", "ts"]
    first = [separator.join(names).encode()] if header else []
    newline = draw(st.sampled_from([b"\n", b"\r\n"]))
    content = newline.join(first + body) + (newline if draw(st.booleans()) else b"")
    if draw(st.booleans()):
        content = b"\xef\xbb\xbf" + content
    columns = {"user": "user", "item": "item", "timestamp": "ts"} if header else {"user": "0", "item": "1", "timestamp": "2"}
    chunk = draw(st.sampled_from([16, 64, text.CHUNK_BYTES]))  # small chunks cut the file at many line boundaries
    id_type = draw(st.sampled_from(["int", "str"]))
    return content, separator, header, columns, chunk, id_type


@pytest.mark.fuzz
@FUZZ
@given(delimited_files())
def test_any_delimited_file_is_accounted_for_or_a_clear_error(case):
    content, separator, header, columns, chunk, id_type = case
    with _workdir() as root, mock.patch.object(text, "CHUNK_BYTES", chunk):
        path = root / "log.csv"
        path.write_bytes(content)
        cfg = file_config(path, sep=separator, header=header, columns=columns, id_type=id_type, format="csv")
        try:
            result = files.read_file(cfg)
        except IngestError:
            return
        _accounted(result, content, header)


@st.composite
def movielens_files(draw):
    name, separator = draw(st.sampled_from([("u.data", "\t"), ("ratings.dat", "::")]))
    good = st.tuples(ids, ids, st.sampled_from(["1", "3.5", "x"]), ids).map(separator.join)
    bad = lines.map(separator.join)
    rows = draw(st.lists(st.one_of(good, good, bad), min_size=1, max_size=25))
    rows[0] = draw(good)  # the format is recognised by its first line's field count
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    return name, newline.join(rows).encode() + b"\n", draw(st.sampled_from([16, text.CHUNK_BYTES]))


@pytest.mark.fuzz
@FUZZ
@given(movielens_files())
def test_any_movielens_file_is_accounted_for_or_a_clear_error(case):
    name, content, chunk = case
    with _workdir() as root, mock.patch.object(text, "CHUNK_BYTES", chunk):
        path = root / name
        path.write_bytes(content)
        try:
            result = movielens.read_movielens(ml_config(path))
        except IngestError:
            return
        _accounted(result, content, header=False)


# --------------------------------------------------------------------------- Parquet

def _column(draw, n: int):
    kind = draw(st.sampled_from(["int64", "int8", "uint64", "float", "string", "numeric_string", "bool", "timestamp",
                                 "timestamp_tz", "date", "null", "binary"]))
    if kind in ("int64", "int8", "uint64"):
        info = np.iinfo(kind)
        values = draw(st.lists(st.integers(int(info.min), int(info.max)), min_size=n, max_size=n))
        return pa.array(values, type=getattr(pa, kind)())
    if kind == "float":
        return pa.array(draw(st.lists(st.floats() | st.none(), min_size=n, max_size=n)), type=pa.float64())
    if kind == "string":
        return pa.array(draw(st.lists(st.text(max_size=6) | st.none(), min_size=n, max_size=n)), type=pa.string())
    if kind == "numeric_string":
        return pa.array(draw(st.lists(numbers | st.none(), min_size=n, max_size=n)), type=pa.string())
    if kind == "bool":
        return pa.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    if kind in ("timestamp", "timestamp_tz"):
        moments = draw(st.lists(st.datetimes(min_value=dt.datetime(1, 1, 1), max_value=dt.datetime(9999, 1, 1)) | st.none(),
                                min_size=n, max_size=n))
        return pa.array(moments, type=pa.timestamp("us", tz="UTC" if kind == "timestamp_tz" else None))
    if kind == "date":
        return pa.array(draw(st.lists(st.dates(), min_size=n, max_size=n)), type=pa.date32())
    if kind == "binary":
        return pa.array(draw(st.lists(st.binary(max_size=4), min_size=n, max_size=n)), type=pa.binary())
    return pa.nulls(n)


@st.composite
def parquet_tables(draw):
    n = draw(st.integers(0, 20))
    names = ["user", "item", "ts"] + (["rating"] if draw(st.booleans()) else [])
    table = pa.table({name: _column(draw, n) for name in names})
    return table, draw(st.sampled_from(["int", "str"])), draw(st.sampled_from([1, 7, files.PARQUET_BATCH_ROWS]))


@pytest.mark.fuzz
@FUZZ
@given(parquet_tables())
def test_any_parquet_file_is_accounted_for_or_a_clear_error(case):
    table, id_type, batch_rows = case
    columns = ColumnMapping(user="user", item="item", timestamp="ts", rating="rating" if "rating" in table.column_names else None)
    with _workdir() as root, mock.patch.object(files, "PARQUET_BATCH_ROWS", batch_rows):
        path = root / "log.parquet"
        pq.write_table(table, path)
        try:
            result = files.read_file(file_config(path, columns=columns.model_dump(), id_type=id_type))
        except IngestError:
            return
        assert result.details["rows_read"] == result.table.num_rows + len(result.quarantine) == table.num_rows


# --------------------------------------------------------------------------- typed conversion

strings = st.lists(st.one_of(numbers, junk, st.none(), st.dates().map(str), st.datetimes().map(str)), max_size=12)


@pytest.mark.fuzz
@FUZZ
@given(strings)
def test_typed_conversion_of_a_value_does_not_depend_on_its_neighbours(values):
    """Each value converts (or is flagged bad) the same alone as in any column; a non-null value is never lost silently."""
    column = pa.chunked_array([pa.array(values, type=pa.string())])
    for parser in (parse.parse_integer_ids, parse.parse_numbers, parse.parse_datetimes):
        converted, bad = parser(column)
        bad = np.zeros(len(values), dtype=bool) if bad is None else bad
        out = converted.to_pylist()
        for i, value in enumerate(values):
            if value is None:
                assert out[i] is None and not bad[i], (parser.__name__, value)
                continue
            assert (out[i] is None) == bool(bad[i]), (parser.__name__, value, out[i], bad[i])
            alone, alone_bad = parser(pa.chunked_array([pa.array([value], type=pa.string())]))
            same = alone.to_pylist()[0]
            assert bool(alone_bad is not None and alone_bad[0]) == bool(bad[i]), (parser.__name__, value, values)
            if same is not None and out[i] is not None:
                assert float(same) == float(out[i]) if parser is parse.parse_numbers else same == out[i], (parser.__name__, value)


# --------------------------------------------------------------------------- errors never quote a file

SECRET = "s3cr3t-" + "K" * 48  # longer than any quote an error may make


@pytest.mark.fuzz
@FUZZ
@given(separator=st.sampled_from(SEPARATORS), header=st.booleans(), layout=st.sampled_from(["alone", "fields", "header"]),
       reader=st.sampled_from(["file", "movielens_dir", "movielens_file", "parquet"]))
def test_no_reader_error_quotes_the_file(separator, header, layout, reader):
    """Whatever file a reader is pointed at (ingest.file.path, ingest.movielens.path), its error quotes at most a token."""
    line = {"alone": SECRET, "fields": separator.join([SECRET, "2", SECRET]), "header": f"user{separator}{SECRET}"}[layout]
    with _workdir() as root:
        if reader == "parquet":
            path = root / "secret.parquet"
            path.write_bytes(b"PAR1" + SECRET.encode() * 3)
        else:
            path = root / ("u.data" if reader == "movielens_dir" else "secret.txt")
            path.write_text(f"{line}\n{line}\n", encoding="utf-8")
        try:
            if reader.startswith("movielens"):
                movielens.read_movielens(ml_config(root if reader == "movielens_dir" else path))
            else:
                files.read_file(file_config(path, sep=separator, header=header))
        except IngestError as err:  # a file that reads as interactions is no error: nothing to check then
            assert SECRET[: text.QUOTED_CHARS + 1] not in str(err), str(err)


def test_a_checksum_url_pointing_at_any_file_is_not_quoted(tmp_path):
    """ingest.movielens.base_url=file:///...#: the 'checksum file' read is any file; the error must not print it."""
    secret = tmp_path / "secret.txt"
    secret.write_text(f"admin:{SECRET}:0:0\n")
    with pytest.raises(IngestError, match="holds no MD5 checksum") as err:
        download.download_movielens("ml-100k", tmp_path / "out", f"{secret.as_uri()}#")
    assert SECRET[: text.QUOTED_CHARS + 1] not in str(err.value) and "admin" not in str(err.value)


def test_header_names_in_errors_are_cut_to_short_tokens(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text(f"user,{SECRET},{SECRET}\n1,2,3\n")
    with pytest.raises(IngestError) as err:
        files.read_file(file_config(path))
    message = str(err.value)
    assert f"{SECRET[: text.QUOTED_CHARS]!r}..." in message and SECRET[: text.QUOTED_CHARS + 1] not in message
    assert "'user'" in message  # a real column name still reads whole


def test_a_pyarrow_error_keeps_its_reason_but_not_the_data():
    assert text.arrow_reason(pa.ArrowInvalid(f"CSV parse error: Expected 3 columns, got 1: {SECRET}")) == (
        "CSV parse error: Expected 3 columns, got 1")


# --------------------------------------------------------------------------- what the fuzzing found, pinned


def _read_csv(tmp_path: Path, content: bytes, **overrides):
    path = tmp_path / "log.csv"
    path.write_bytes(content)
    return files.read_file(file_config(path, columns={"user": "u", "item": "i", "timestamp": "t", "rating": "r"}, **overrides))


def test_a_stray_carriage_return_quarantines_its_line_instead_of_splitting_it(tmp_path):
    result = _read_csv(tmp_path, b"u,i,t,r\n1,2,3,4\n5,6\r,7,8\n9,10,11,12\r\n", id_type="int")
    assert result.details["rows_read"] == 3 and result.table.num_rows == 2
    assert list(zip(result.quarantine["line"], result.quarantine["reason"], strict=True)) == [(3, "stray_carriage_return")]


def test_a_carriage_return_in_the_header_is_a_clear_error(tmp_path):
    with pytest.raises(IngestError, match="the first line cannot be split"):
        _read_csv(tmp_path, b"u,i\r,t,r\n1,2,3,4\n")


@pytest.mark.parametrize("neighbour", [None, "x"])
def test_a_value_converts_the_same_whatever_its_neighbours(tmp_path, neighbour):
    """Hexadecimal IDs, 'nan' ratings and non-date strings are bad alone too; 19-digit IDs convert next to bad ones."""
    lines = [b"u,i,t,r", b"0x1f,1,5,1", b"1,1000000000000000000,5,nan", b"2,3,5,16777217"]
    if neighbour:
        lines.append(b"x,y,5,1")
    result = _read_csv(tmp_path, b"\n".join(lines) + b"\n", id_type="int")
    reasons = dict(zip(result.quarantine["line"], result.quarantine["reason"], strict=True))
    assert reasons[2] == "non_numeric_user_id" and reasons[3] == "non_numeric_rating"
    assert result.table.to_pylist()[0]["item_id"] == 3 and result.table.to_pylist()[0]["rating"] == 16777216.0
    converted, bad = parse.parse_integer_ids(pa.chunked_array([pa.array(["1000000000000000000", neighbour])]))
    assert converted.to_pylist()[0] == 10**18 and (bad is None or not bad[0])
    dates, bad = parse.parse_datetimes(pa.chunked_array([pa.array(["-1", "2020-01-02", neighbour])]))
    assert bad is not None and bad[0] and dates.to_pylist()[1] is not None


def test_only_an_empty_field_is_missing(tmp_path):
    """'NA', 'null', 'nan' are IDs like any other string (pyarrow's default null values would drop them)."""
    result = _read_csv(tmp_path, b"u,i,t,r\nNA,null,5,1\nN/A,nan,5,\n")
    assert [(row["user_id"], row["item_id"], row["rating"]) for row in result.table.to_pylist()] == [
        ("NA", "null", 1.0), ("N/A", "nan", None)]


def test_an_unbalanced_quote_never_swallows_the_next_line(tmp_path):
    """'1,2,5,"' + newline + '3' reads as one row of four fields under quoting: each line must stay a record."""
    result = _read_csv(tmp_path, b'u,i,t,r\n1,2,5,"\n3\n4,5,6,7\n', id_type="int")
    assert result.details["rows_read"] == 3 == result.table.num_rows + len(result.quarantine)
    assert list(zip(result.quarantine["line"], result.quarantine["reason"], strict=True)) == [
        (2, "non_numeric_rating"), (3, "missing_fields")]
