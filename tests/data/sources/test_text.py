"""pipeline.data.sources.text: lines that do not split (bytes, fields, quotes, separators), their line numbers, chunks.

Each test writes its own tiny files into tmp_path.
"""

from __future__ import annotations

from pipeline.data.sources import files, movielens, text
from tests.data.sources.helpers import (
    U_DATA,
    assert_accounts_for_every_row,
    file_config,
    ml_config,
    quarantined,
    rows,
    utc,
    write,
)


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
