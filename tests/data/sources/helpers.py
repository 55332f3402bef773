"""Shared by the tests of pipeline.data.sources: tiny files in the official formats, configs, and row views."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa

from pipeline.core import schema
from pipeline.core.config import FileConfig, MovieLensConfig
from pipeline.data.sources import convert

UTC = dt.UTC
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
