"""pipeline.data.sources.movielens: the MovieLens formats, finding the ratings file, clear errors.

Each test writes its own tiny files in the official formats into tmp_path.
"""

from __future__ import annotations

import typing
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline.core import schema
from pipeline.core.config import MovieLensConfig
from pipeline.core.errors import IngestError
from pipeline.data.sources import download, movielens
from tests.data.sources.helpers import (
    RATINGS_CSV,
    RATINGS_DAT,
    U_DATA,
    assert_accounts_for_every_row,
    ml_config,
    rows,
    utc,
    write,
)

REAL_ML_100K = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "ml-100k"


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
    assert "19 characters long" in message and "4 comma-separated fields" in message  # what was found
    assert "196" not in message  # the line itself is never quoted: the file may be anything


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


def test_download_variants_are_the_formats_variants_and_the_configs():
    # download owns the list (movielens imports it); the formats and the config's choices must name the same archives.
    from_formats = tuple(variant for fmt in movielens.MOVIELENS_FORMATS for variant in fmt.variants)
    from_config = typing.get_args(MovieLensConfig.model_fields["variant"].annotation)

    assert download.MOVIELENS_VARIANTS == from_formats
    assert ("auto", *download.MOVIELENS_VARIANTS) == from_config


@pytest.mark.skipif(not (REAL_ML_100K / "u.data").is_file(), reason=f"real MovieLens 100K not found at {REAL_ML_100K}")
def test_real_ml_100k_loads_completely():
    result = movielens.read_movielens(ml_config(REAL_ML_100K))

    assert result.table.num_rows == 100_000
    assert pc.count_distinct(result.table["user_id"]).as_py() == 943
    assert pc.count_distinct(result.table["item_id"]).as_py() == 1682
    assert result.quarantine.empty
    assert pc.min(result.table["rating"]).as_py() == 1.0 and pc.max(result.table["rating"]).as_py() == 5.0
    assert isinstance(result.quarantine, pd.DataFrame)
