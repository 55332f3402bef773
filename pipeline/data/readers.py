"""Source files -> the raw interactions table (`schema.raw_schema`) plus the rows set aside.

Two sources:

* `read_movielens`: the official MovieLens rating files, format detected from the
  file name or its first line: ML-100K `u.data` (tab-separated), ML-1M/10M
  `ratings.dat` (`::`-separated), ML-20M/25M/32M `ratings.csv` (comma, with a
  header). Optionally downloaded and checksum-verified first.
* `read_file`: any CSV or Parquet file of interactions, columns mapped by
  `FileConfig.columns`.

Quarantine reasons (`ReadResult.quarantine["reason"]`):

    invalid_utf8           the line's bytes are not UTF-8 (`raw` is their repr())
    extra_fields           more fields than the header / format has
    missing_fields         fewer fields (e.g. a truncated last line)
    malformed_separator    a lone ':' where '::' belongs, the field count still right
    non_numeric_user_id    ids declared numeric (MovieLens; id_type "int") but not an integer
    non_numeric_item_id
    non_numeric_timestamp  an epoch timestamp that is not a number
    unparseable_datetime   a date string (timestamp_unit "datetime") that is not ISO 8601
    timestamp_out_of_range an epoch number that overflows timestamp[us]
    non_numeric_rating
    unknown_event          an event missing from `event_weights`

A row gets the first reason that applies, in this order.

Contract with the validate stage: the reader only rejects what it cannot
*parse* (wrong number of fields, undecodable bytes, text where a number is
declared, unknown events). Rows that parse but are wrong (null keys, duplicates,
out-of-range ratings or dates) pass through; validate quarantines them. Every
data line ends up either in `ReadResult.table` or in `ReadResult.quarantine`,
so `details["rows_read"] == table.num_rows + len(quarantine)`. Blank lines are
not data lines; they are only counted (`details["blank_lines"]`).

How text is read, and why (files go up to 32M lines):

* the file is read in chunks of whole lines (`CHUNK_BYTES`), so memory holds one
  chunk of text at a time, not the file;
* a chunk is checked as UTF-8 in one call; only when that fails is it split
  into lines to find and quarantine the undecodable ones;
* pyarrow.csv parses the chunk with every column read as a string and an
  `invalid_row_handler` that captures lines with the wrong number of fields
  (with their text and row number);
* numbers are then coerced column-wise with pyarrow.compute; a per-row Python
  loop runs only on rows that are being quarantined;
* the timestamp unit ("auto") is decided once, on the first chunk holding
  timestamps (see `_Converter`), from the magnitude of the median
  (TIMESTAMP_UNIT_THRESHOLDS).
"""

from __future__ import annotations

import csv as pycsv
import functools
import hashlib
import json
import logging
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.core import schema
from pipeline.core.config import ColumnMapping, FileConfig, MovieLensConfig
from pipeline.core.errors import IngestError

logger = logging.getLogger(__name__)

# Bytes of whole lines handed to the parser at once: big enough that per-chunk
# overhead vanishes, small enough to bound memory. Tests lower it to exercise
# chunk boundaries.
CHUNK_BYTES = 64 * 2**20
# pyarrow's own block size inside a chunk; 4 MiB measured fastest for the
# single-threaded parser (which we need: it numbers the rows it rejects).
ARROW_BLOCK_BYTES = 4 * 2**20
PARQUET_BATCH_ROWS = 1_000_000
DOWNLOAD_BLOCK_BYTES = 2**20

# Auto-detected timestamp unit, from the magnitude of the median timestamp:
#   median < 1e11 -> seconds       (1e11 s is in the year 5138)
#   median < 1e14 -> milliseconds  (1e11 ms is 1973-03-03; 1e14 ms is in 5138)
#   median < 1e17 -> microseconds  (same bounds, x1000)
#   otherwise     -> nanoseconds
# So any date between 1973-03-03 and 5138 is read right whatever its unit.
TIMESTAMP_UNIT_THRESHOLDS: tuple[tuple[float, str], ...] = ((1e11, "s"), (1e14, "ms"), (1e17, "us"))
MICROS_PER_UNIT: dict[str, int] = {"s": 1_000_000, "ms": 1_000, "us": 1}
INT64_MAX = np.iinfo(np.int64).max

# An integer id, optionally written as a float with a zero fraction ("12.0", as
# pandas writes int columns holding NaN). 18 digits always fit in int64.
INTEGER_ID_PATTERN = r"^\s*(?P<digits>-?\d{1,18})(?:\.0*)?\s*$"
NUMBER_PATTERN = r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$"
ISO_DATE_PREFIX = re.compile(r"^\s*\d{4}-\d{1,2}-\d{1,2}")

FILLER_PREFIX = "__filler_"

QUARANTINE_LINE = "line"
QUARANTINE_RAW = "raw"

IdType = Literal["int", "str"]


@dataclass
class ReadResult:
    """What a reader produced.

    table: exactly `schema.raw_schema(id_type)`; user_id/item_id/timestamp may hold
        nulls (validate quarantines them).
    quarantine: one row per data line set aside: `line` (1-based line number in a
        text file, 0-based row index in a Parquet file), `raw` (the line or row;
        `repr()` of the bytes when they are not UTF-8) and `reason` (snake_case code).
    details: how the source was read (format, path, timestamp unit, counts), for
        the ingest report.
    """

    table: pa.Table
    quarantine: pd.DataFrame
    details: dict


# --------------------------------------------------------------------------- quarantine


class _Quarantine:
    """Collects the rows set aside, a reason at a time."""

    def __init__(self) -> None:
        self._lines: list[np.ndarray] = []
        self._raws: list[list[str]] = []
        self._reasons: list[str] = []

    def add(self, lines: np.ndarray, raws: list[str], reason: str) -> None:
        if len(lines):
            self._lines.append(np.asarray(lines, dtype=np.int64))
            self._raws.append(list(raws))
            self._reasons.append(reason)

    def __len__(self) -> int:
        return sum(len(lines) for lines in self._lines)

    def counts(self) -> dict[str, int]:
        counter: Counter[str] = Counter()
        for lines, reason in zip(self._lines, self._reasons):
            counter[reason] += len(lines)
        return dict(sorted(counter.items()))

    def frame(self) -> pd.DataFrame:
        lines = np.concatenate(self._lines) if self._lines else np.empty(0, np.int64)
        raws = [raw for group in self._raws for raw in group]
        reasons = [reason for lines_, reason in zip(self._lines, self._reasons) for _ in range(len(lines_))]
        frame = pd.DataFrame(
            {
                QUARANTINE_LINE: pd.Series(lines, dtype="int64"),
                QUARANTINE_RAW: pd.Series(raws, dtype="str"),
                schema.QUARANTINE_REASON: pd.Series(reasons, dtype="str"),
            }
        )
        # File order reads best: chunks add their problems reason by reason.
        return frame.sort_values(QUARANTINE_LINE, kind="stable", ignore_index=True)


# --------------------------------------------------------------------------- column coercion
# Each returns the converted values and a boolean numpy mask of the rows that
# could not be converted (None when there are none: the fast path). Nulls stay
# null and are never "bad": validate deals with them.


def _bad_mask(mask: pa.ChunkedArray | pa.Array) -> np.ndarray | None:
    mask = pc.fill_null(mask, False)
    if not pc.any(mask).as_py():
        return None
    return np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool)


def _as_strings(values: pa.ChunkedArray) -> pa.ChunkedArray:
    return values if values.type == pa.string() else pc.cast(values, pa.string())


def _parse_integer_ids(values: pa.ChunkedArray) -> tuple[pa.ChunkedArray, np.ndarray | None]:
    """Ids declared numeric -> int64."""
    if pa.types.is_integer(values.type):
        return pc.cast(values, pa.int64()), None
    if pa.types.is_floating(values.type):
        # A float id column (pandas writes int columns holding NaN as float):
        # integral values convert, NaN is a missing key (null), anything else is bad.
        integral = pc.and_(pc.equal(values, pc.floor(values)), pc.less(pc.abs(values), 9.2e18))
        bad = _bad_mask(pc.and_(pc.invert(integral), pc.invert(pc.is_nan(values))))
        return pc.cast(pc.if_else(integral, values, None), pa.int64()), bad
    strings = _as_strings(values)
    try:
        return pc.cast(strings, pa.int64()), None
    except pa.ArrowInvalid:
        pass
    digits = pc.struct_field(pc.extract_regex(strings, INTEGER_ID_PATTERN), "digits")
    bad = _bad_mask(pc.and_(pc.is_valid(strings), pc.is_null(digits)))
    return pc.cast(digits, pa.int64()), bad


def _parse_numbers(values: pa.ChunkedArray) -> tuple[pa.ChunkedArray, np.ndarray | None]:
    """Numbers -> int64 when every value is an integer (exact), else float64."""
    if pa.types.is_integer(values.type):
        return pc.cast(values, pa.int64()), None
    if pa.types.is_floating(values.type) or pa.types.is_decimal(values.type):
        return pc.cast(values, pa.float64()), None
    strings = _as_strings(values)
    for target in (pa.int64(), pa.float64()):
        try:
            return pc.cast(strings, target), None
        except pa.ArrowInvalid:
            continue
    is_number = pc.match_substring_regex(strings, NUMBER_PATTERN)
    bad = _bad_mask(pc.invert(is_number))
    numbers_only = pc.if_else(pc.fill_null(is_number, False), pc.utf8_trim_whitespace(strings), None)
    try:
        return pc.cast(numbers_only, pa.int64()), bad
    except pa.ArrowInvalid:
        return pc.cast(numbers_only, pa.float64()), bad


def _parse_datetimes(values: pa.ChunkedArray) -> tuple[pa.ChunkedArray, np.ndarray | None]:
    """ISO 8601 strings -> UTC. Strings without a zone offset are taken as UTC."""
    strings = _as_strings(values)
    # Arrow's parser is fastest but all-or-nothing, and wants one kind of string
    # per column: all with an offset, or all without.
    for parsed_type in (schema.TIMESTAMP_TYPE, pa.timestamp("us")):
        try:
            return pc.cast(pc.cast(strings, parsed_type), schema.TIMESTAMP_TYPE), None
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue
    # Mixed or partly invalid: pandas parses element-wise (still vectorised C).
    parsed = pd.to_datetime(strings.to_pandas(), utc=True, errors="coerce", format="ISO8601")
    utc_wall_clock = parsed.dt.tz_localize(None).to_numpy()  # NaT where unparseable
    timestamps = pa.chunked_array([pa.array(utc_wall_clock, from_pandas=True)]).cast(schema.TIMESTAMP_TYPE, safe=False)
    bad = _bad_mask(pc.and_(pc.is_valid(strings), pc.is_null(timestamps)))
    return timestamps, bad


def _native_timestamps(values: pa.ChunkedArray) -> pa.ChunkedArray:
    """A Parquet timestamp/date column -> timestamp[us, UTC]; naive values are taken as UTC."""
    if pa.types.is_date(values.type):
        values = pc.cast(values, pa.timestamp("us"))
    if values.type.tz is None:
        values = pc.cast(values, pa.timestamp(values.type.unit, tz="UTC"))
    # ns -> us drops the sub-microsecond part (safe=False: truncation is intended).
    return values.cast(schema.TIMESTAMP_TYPE, safe=False)


def detect_timestamp_unit(numbers: pa.ChunkedArray) -> str:
    """Unit of epoch numbers from the magnitude of their median (see TIMESTAMP_UNIT_THRESHOLDS)."""
    # safe=False: nanosecond integers exceed float64's exact range; the magnitude is all that matters.
    median = pc.approximate_median(pc.abs(numbers.cast(pa.float64(), safe=False))).as_py()
    for upper_bound, unit in TIMESTAMP_UNIT_THRESHOLDS:
        if median < upper_bound:
            return unit
    return "ns"


def _epoch_to_timestamps(numbers: pa.ChunkedArray, unit: str) -> tuple[pa.ChunkedArray, np.ndarray | None]:
    """Epoch numbers in `unit` -> timestamp[us, UTC]; also the rows that overflow it."""
    if pa.types.is_integer(numbers.type):
        if unit == "ns":
            return pc.divide(numbers, 1_000).cast(schema.TIMESTAMP_TYPE), None
        factor = MICROS_PER_UNIT[unit]
        limit = INT64_MAX // factor
        extremes = pc.min_max(numbers)
        if extremes["min"].as_py() is None or -limit <= extremes["min"].as_py() <= extremes["max"].as_py() <= limit:
            return pc.multiply(numbers, factor).cast(schema.TIMESTAMP_TYPE), None  # the usual case
        out_of_range = pc.or_(pc.greater(numbers, limit), pc.less(numbers, -limit))
        micros = pc.multiply(pc.if_else(out_of_range, None, numbers), factor)
    else:
        scaled = pc.multiply(numbers, 1e-3 if unit == "ns" else float(MICROS_PER_UNIT[unit]))
        # NaN and inf compare False, so they land in out_of_range too.
        out_of_range = pc.invert(pc.fill_null(pc.less(pc.abs(scaled), 9.2e18), True))
        micros = pc.cast(pc.round(pc.if_else(out_of_range, None, scaled)), pa.int64())
    return micros.cast(schema.TIMESTAMP_TYPE), _bad_mask(out_of_range)


def _constant_strings(value: str, n_rows: int) -> pa.Array:
    """`value` n_rows times, as a string array."""
    encoded = value.encode("utf-8")
    if n_rows * len(encoded) >= 2**31:  # beyond int32 offsets: let pyarrow build it
        return pa.repeat(value, n_rows)
    # Laying out the buffers directly is ~2x faster than pa.repeat, which copies value by value.
    offsets = np.arange(n_rows + 1, dtype=np.int32) * np.int32(len(encoded))
    return pa.StringArray.from_buffers(n_rows, pa.py_buffer(offsets), pa.py_buffer(encoded * n_rows))


def _looks_like_datetimes(strings: pa.ChunkedArray) -> bool:
    sample = pc.drop_null(strings).slice(0, 1000).to_pylist()
    dated = sum(1 for text in sample if ISO_DATE_PREFIX.match(text))
    return bool(sample) and dated * 2 > len(sample)


# --------------------------------------------------------------------------- rows -> raw schema

Locate = Callable[[np.ndarray], tuple[np.ndarray, list[str]]]
"""Row positions in a batch -> (their line numbers / row indexes, their raw text)."""


class _Converter:
    """Turns batches of source columns into raw-schema tables, quarantining what does not convert.

    Holds the one decision that must stay fixed across a file's chunks: the
    timestamp unit, taken (when "auto") from the first chunk holding timestamps.
    That chunk is the whole column for files under CHUNK_BYTES and millions of
    rows otherwise; deciding it there lets every chunk be converted, and its bad
    rows quarantined with their line text, while that text is still in memory.
    """

    def __init__(
        self,
        columns: ColumnMapping,
        *,
        id_type: IdType,
        timestamp_unit: str,
        event_weights: Mapping[str, float] | None,
        source: str,
        quarantine: _Quarantine,
    ) -> None:
        self.columns = columns
        self.id_type = id_type
        self.event_weights = dict(event_weights) if event_weights else None
        self.source = source
        self.quarantine = quarantine
        self.schema = schema.raw_schema(pa.int64() if id_type == "int" else pa.string())
        self.timestamp_unit: str | None = None if timestamp_unit == "auto" else timestamp_unit
        self.timestamp_unit_detected = False

    def convert(self, batch: Mapping[str, pa.ChunkedArray], locate: Locate) -> pa.Table:
        n_rows = len(batch[self.columns.user])
        problems: list[tuple[str, np.ndarray | None]] = []  # checked in this order: first reason wins

        users, bad = self._ids(batch[self.columns.user])
        problems.append(("non_numeric_user_id", bad))
        items, bad = self._ids(batch[self.columns.item])
        problems.append(("non_numeric_item_id", bad))
        timestamps, timestamp_problems = self._timestamps(batch[self.columns.timestamp], n_rows)
        problems.extend(timestamp_problems)
        ratings, rating_problems = self._ratings(batch, n_rows)
        problems.extend(rating_problems)

        columns = [users, items, timestamps, ratings]
        problems = [(reason, mask) for reason, mask in problems if mask is not None]
        if problems:
            set_aside = np.zeros(n_rows, dtype=bool)
            for reason, mask in problems:
                rows = np.flatnonzero(mask & ~set_aside)
                set_aside[rows] = True
                self.quarantine.add(*locate(rows), reason)
            keep = pa.array(~set_aside)
            columns = [pc.filter(column, keep) for column in columns]
        n_kept = len(columns[0])
        # The constant source column is added last, so it is never filtered.
        return pa.Table.from_arrays([*columns, _constant_strings(self.source, n_kept)], schema=self.schema)

    def _ids(self, values: pa.ChunkedArray) -> tuple[pa.ChunkedArray, np.ndarray | None]:
        if self.id_type == "str":
            return _as_strings(values), None
        return _parse_integer_ids(values)

    def _timestamps(self, values: pa.ChunkedArray, n_rows: int) -> tuple[pa.ChunkedArray, list]:
        if pa.types.is_timestamp(values.type) or pa.types.is_date(values.type):
            return _native_timestamps(values), []
        is_text = pa.types.is_string(values.type) or pa.types.is_large_string(values.type)
        if self.timestamp_unit is None and is_text and _looks_like_datetimes(values):
            self._detected_unit("datetime")
        if self.timestamp_unit == "datetime":
            if not is_text:
                raise IngestError(
                    f"timestamp_unit is 'datetime' but column {self.columns.timestamp!r} holds {values.type}, "
                    "not date strings; set timestamp_unit to s/ms/us/ns or auto"
                )
            timestamps, bad = _parse_datetimes(values)
            return timestamps, [("unparseable_datetime", bad)]

        numbers, bad = _parse_numbers(values)
        problems = [("non_numeric_timestamp", bad)]
        if self.timestamp_unit is None:
            if numbers.null_count == len(numbers):
                # Nothing to decide the unit from yet: all null (validate quarantines them).
                return pa.chunked_array([pa.nulls(n_rows, schema.TIMESTAMP_TYPE)]), problems
            self._detected_unit(detect_timestamp_unit(numbers))
        timestamps, out_of_range = _epoch_to_timestamps(numbers, self.timestamp_unit)
        problems.append(("timestamp_out_of_range", out_of_range))
        return timestamps, problems

    def _detected_unit(self, unit: str) -> None:
        self.timestamp_unit = unit
        self.timestamp_unit_detected = True
        logger.info("timestamps of %s read as %s (auto-detected)", self.source, unit)

    def _ratings(self, batch: Mapping[str, pa.ChunkedArray], n_rows: int) -> tuple[pa.ChunkedArray, list]:
        problems: list[tuple[str, np.ndarray | None]] = []
        ratings = None
        if self.columns.rating is not None:
            numbers, bad = _parse_numbers(batch[self.columns.rating])
            ratings = pc.cast(numbers, pa.float32())
            problems.append(("non_numeric_rating", bad))
        if self.event_weights is not None:
            events = _as_strings(batch[self.columns.event])
            position = pc.index_in(events, value_set=pa.array(list(self.event_weights), pa.string()))
            problems.append(("unknown_event", _bad_mask(pc.is_null(position))))
            if ratings is None:
                weights = pa.array(list(self.event_weights.values()), pa.float32())
                ratings = pc.take(weights, position)
        if ratings is None:
            # Implicit feedback: every interaction counts once.
            ratings = pa.chunked_array([pa.array(np.ones(n_rows, dtype=np.float32))])
        return ratings, problems

    def describe(self) -> dict:
        return {"timestamp_unit": self.timestamp_unit, "timestamp_unit_detected": self.timestamp_unit_detected}


# --------------------------------------------------------------------------- delimited text


@dataclass(frozen=True)
class _Delimited:
    """How to split the lines of a text file into named fields.

    pyarrow takes a one-character delimiter. A separator made of one character
    repeated, like MovieLens' "::", is parsed as that character with empty
    filler fields in between ("1::2" is "1", "", "2" split on ':'): no copy of
    the text is needed, and a filler that is not empty reveals a malformed line.
    """

    names: tuple[str, ...]
    separator: str
    quoted: bool

    def __post_init__(self) -> None:
        if not self.separator or self.separator != self.separator[0] * len(self.separator):
            raise IngestError(
                f"separator {self.separator!r} is not supported: use one character, or one character "
                "repeated such as '::'"
            )

    @property
    def parsed_names(self) -> list[str]:
        """Names of the fields pyarrow sees: the real ones, with fillers between them."""
        fillers_per_gap = len(self.separator) - 1
        out = [self.names[0]]
        for gap, name in enumerate(self.names[1:], start=1):
            out.extend(f"{FILLER_PREFIX}{gap}_{k}" for k in range(fillers_per_gap))
            out.append(name)
        return out

    @property
    def fillers(self) -> list[str]:
        return [name for name in self.parsed_names if name.startswith(FILLER_PREFIX)]

    def split(self, line: str) -> list[str]:
        if self.quoted:
            return next(pycsv.reader([line], delimiter=self.separator))
        return line.split(self.separator)


@dataclass
class _TextChunk:
    """Whole lines of a text file; `first_line` is the 1-based file line number of the first."""

    data: bytes
    first_line: int

    @cached_property
    def _line_starts(self) -> np.ndarray:
        # Offsets where each line starts, plus len(data) (data always ends with "\n").
        newlines = np.flatnonzero(np.frombuffer(self.data, dtype=np.uint8) == ord("\n"))
        return np.concatenate(([0], newlines + 1))

    @cached_property
    def _nonblank_lines(self) -> np.ndarray:
        """0-based chunk line indexes of the lines pyarrow counts as rows (it skips blank ones)."""
        starts = self._line_starts[:-1]
        lengths = self._line_starts[1:] - 1 - starts
        data = np.frombuffer(self.data, dtype=np.uint8)
        only_cr = (lengths == 1) & (data[starts] == ord("\r"))
        return np.flatnonzero((lengths > 0) & ~only_cr)

    @cached_property
    def n_lines(self) -> int:
        return self.data.count(b"\n")

    def lines_of_row_numbers(self, numbers: np.ndarray) -> np.ndarray:
        """pyarrow's 1-based row numbers (blank lines not counted) -> file line numbers."""
        if len(numbers) == 0:
            return np.empty(0, dtype=np.int64)  # spares the scan for line starts
        return self.first_line + self._nonblank_lines[np.asarray(numbers, dtype=np.int64) - 1]

    def texts(self, file_lines: np.ndarray) -> list[str]:
        starts = self._line_starts
        texts = []
        for index in np.asarray(file_lines) - self.first_line:
            line = self.data[starts[index] : starts[index + 1] - 1]
            texts.append(line.decode("utf-8").removesuffix("\r"))
        return texts


def _iter_line_chunks(path: Path, start: int, first_line: int, chunk_bytes: int) -> Iterator[_TextChunk]:
    """Chunks of whole lines from byte offset `start` on; the last line gets its missing "\\n"."""
    size = path.stat().st_size
    with (
        open(path, "rb") as stream,
        tqdm(
            total=size - start, unit="B", unit_scale=True, desc=path.name, leave=False,
            disable=None if size > chunk_bytes else True,
        ) as progress,
    ):
        stream.seek(start)
        carry = b""
        line = first_line
        while block := stream.read(chunk_bytes):
            progress.update(len(block))
            block = carry + block
            cut = block.rfind(b"\n") + 1
            if cut == 0:  # a line longer than a chunk: keep reading until it ends
                carry = block
                continue
            chunk, carry = block[:cut], block[cut:]
            text_chunk = _TextChunk(chunk, line)
            yield text_chunk
            line += text_chunk.n_lines
        if carry:
            yield _TextChunk(carry + b"\n", line)


def _blank_undecodable_lines(chunk: _TextChunk, quarantine: _Quarantine) -> _TextChunk:
    """Quarantine the lines that are not UTF-8 and blank them, so the rest of the chunk still parses."""
    try:
        chunk.data.decode("utf-8")
        return chunk
    except UnicodeDecodeError:
        pass
    lines = chunk.data.split(b"\n")
    bad_indexes: list[int] = []
    bad_raws: list[str] = []
    for index, line in enumerate(lines):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            bad_indexes.append(index)
            bad_raws.append(repr(line.removesuffix(b"\r")))  # repr: lossless, and a valid str
            lines[index] = b""
    quarantine.add(chunk.first_line + np.array(bad_indexes, dtype=np.int64), bad_raws, "invalid_utf8")
    return _TextChunk(b"\n".join(lines), chunk.first_line)


@dataclass
class _RejectedRows:
    """pyarrow's invalid_row_handler: records the lines that have the wrong number of fields."""

    numbers: list[int] = field(default_factory=list)  # pyarrow's 1-based row numbers
    texts: list[str] = field(default_factory=list)
    too_many: list[bool] = field(default_factory=list)

    def __call__(self, row: pacsv.InvalidRow) -> str:
        self.numbers.append(row.number)
        self.texts.append(row.text)
        self.too_many.append(row.actual_columns > row.expected_columns)
        return "skip"


class _RowLines:
    """Traces the rows of a parsed chunk back to their file lines (only ever asked for rows being quarantined)."""

    def __init__(self, chunk: _TextChunk, rejected_numbers: np.ndarray) -> None:
        self.chunk = chunk
        self._rejected_numbers = np.sort(rejected_numbers)
        self._kept_rows: np.ndarray | None = None  # set when the table was filtered after parsing

    def keep(self, kept_rows: np.ndarray) -> None:
        """The parsed table was filtered down to `kept_rows`."""
        self._kept_rows = kept_rows if self._kept_rows is None else self._kept_rows[kept_rows]

    def row_numbers(self, rows: np.ndarray) -> np.ndarray:
        """pyarrow's row numbers of table rows: table row r holds the (r+1)-th number not rejected."""
        if self._kept_rows is not None:
            rows = self._kept_rows[rows]
        # The n-th rejected number (0-based) has n rejected numbers before it, so
        # `number - n` counts the kept rows up to it; a binary search over those
        # counts finds how many rejected numbers precede each kept row.
        kept_before_rejected = self._rejected_numbers - np.arange(len(self._rejected_numbers))
        return rows + 1 + np.searchsorted(kept_before_rejected, rows + 1, side="right")

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, list[str]]:
        lines = self.chunk.lines_of_row_numbers(self.row_numbers(rows))
        return lines, self.chunk.texts(lines)


def _parse_chunk(chunk: _TextChunk, layout: _Delimited, wanted: list[str]) -> tuple[pa.Table, _RejectedRows]:
    try:
        return _parse_with_arrow(chunk, layout, wanted, block_size=ARROW_BLOCK_BYTES)
    except pa.ArrowInvalid:
        # pyarrow cannot split a line longer than its block; one block for the whole chunk can.
        return _parse_with_arrow(chunk, layout, wanted, block_size=len(chunk.data) + 1)


def _parse_with_arrow(
    chunk: _TextChunk, layout: _Delimited, wanted: list[str], *, block_size: int
) -> tuple[pa.Table, _RejectedRows]:
    rejected = _RejectedRows()
    columns = wanted + layout.fillers
    table = pacsv.read_csv(
        pa.BufferReader(chunk.data),
        # use_threads=False: only the serial parser numbers the rows it rejects,
        # which is how they are traced back to their line.
        read_options=pacsv.ReadOptions(column_names=layout.parsed_names, use_threads=False, block_size=block_size),
        parse_options=pacsv.ParseOptions(
            delimiter=layout.separator[0],
            quote_char='"' if layout.quoted else False,
            invalid_row_handler=rejected,
        ),
        convert_options=pacsv.ConvertOptions(
            column_types={name: pa.string() for name in columns},
            include_columns=columns,
            strings_can_be_null=True,  # an empty field is null, not ""
        ),
    )
    return table, rejected


def _read_text_chunk(
    chunk: _TextChunk, layout: _Delimited, wanted: list[str], converter: _Converter, quarantine: _Quarantine
) -> tuple[pa.Table, int]:
    """One chunk -> its raw-schema rows; also how many data lines (not blank) it held."""
    quarantined_before = len(quarantine)
    chunk = _blank_undecodable_lines(chunk, quarantine)
    n_undecodable = len(quarantine) - quarantined_before
    try:
        parsed, rejected = _parse_chunk(chunk, layout, wanted)
        if layout.quoted and any("\n" in text for text in rejected.texts):
            # An unbalanced quote made pyarrow swallow the following lines into one
            # row. Lines are records here, so this chunk is parsed again without
            # quoting: every line is then accounted for, the broken one quarantined.
            logger.warning("unbalanced quote in lines %d+; parsing that chunk without quoting", chunk.first_line)
            parsed, rejected = _parse_chunk(chunk, replace(layout, quoted=False), wanted)
    except pa.ArrowInvalid as err:
        raise IngestError(f"cannot parse the lines from line {chunk.first_line} on: {err}") from None

    rejected_numbers = np.asarray(rejected.numbers, dtype=np.int64)
    rejected_lines = chunk.lines_of_row_numbers(rejected_numbers)
    too_many = np.asarray(rejected.too_many, dtype=bool)
    texts = np.asarray(rejected.texts, dtype=object)
    quarantine.add(rejected_lines[too_many], list(texts[too_many]), "extra_fields")
    quarantine.add(rejected_lines[~too_many], list(texts[~too_many]), "missing_fields")

    # Counted here, independently of where the rows go next, so _finish can check none was lost.
    n_data_lines = n_undecodable + len(rejected_numbers) + parsed.num_rows
    row_lines = _RowLines(chunk, rejected_numbers)
    if layout.fillers:
        filler_used = functools.reduce(pc.or_, (pc.is_valid(parsed[name]) for name in layout.fillers))
        malformed = _bad_mask(filler_used)
        if malformed is not None:
            quarantine.add(*row_lines.locate(np.flatnonzero(malformed)), "malformed_separator")
            parsed = parsed.filter(pa.array(~malformed))
            row_lines.keep(np.flatnonzero(~malformed))
    return converter.convert({name: parsed[name] for name in wanted}, row_lines.locate), n_data_lines


def _read_delimited(
    path: Path, layout: _Delimited, *, data_start: int, first_line: int, converter: _Converter, quarantine: _Quarantine
) -> tuple[list[pa.Table], dict]:
    wanted = [name for name in layout.names if name in _mapped_columns(converter.columns)]
    tables: list[pa.Table] = []
    n_lines = data_lines = 0
    for chunk in _iter_line_chunks(path, data_start, first_line, CHUNK_BYTES):
        table, n_data_lines = _read_text_chunk(chunk, layout, wanted, converter, quarantine)
        tables.append(table)
        data_lines += n_data_lines
        n_lines += chunk.n_lines
    return tables, {"data_lines": data_lines, "blank_lines": n_lines - data_lines}


def _peek_first_line(path: Path) -> tuple[str, int]:
    """The first line (decoded leniently, without BOM or newline) and the byte offset just after it."""
    with open(path, "rb") as stream:
        raw = stream.readline(2**20)
    return raw.decode("utf-8", errors="replace").removeprefix("\ufeff").rstrip("\r\n"), len(raw)


def _bom_length(path: Path) -> int:
    with open(path, "rb") as stream:
        return 3 if stream.read(3) == b"\xef\xbb\xbf" else 0


def _describe_line(line: str) -> str:
    shown = repr(line[:120]) + ("..." if len(line) > 120 else "")
    candidates = (("\t", "tab"), ("::", "'::'"), (",", "comma"), (";", "semicolon"), ("|", "pipe"), (" ", "space"))
    n_fields, name = max((len(line.split(sep)), name) for sep, name in candidates)
    if n_fields > 1:
        return f"{shown}, which looks like {n_fields} {name}-separated fields"
    return f"{shown}, which has no tab, '::', comma, semicolon, pipe or space in it"


def _mapped_columns(columns: ColumnMapping) -> list[str]:
    mapped = [columns.user, columns.item, columns.timestamp, columns.rating, columns.event]
    return list(dict.fromkeys(name for name in mapped if name is not None))


def _finish(
    tables: list[pa.Table],
    quarantine: _Quarantine,
    converter: _Converter,
    details: dict,
    *,
    started: float,
    empty_message: str,
) -> ReadResult:
    details = dict(details)
    rows_read = details.pop("data_lines")
    if rows_read == 0:
        raise IngestError(empty_message)
    table = pa.concat_tables(tables) if tables else converter.schema.empty_table()
    frame = quarantine.frame()
    if table.num_rows + len(frame) != rows_read:
        # A bug guard: rows must never disappear without a trace.
        raise RuntimeError(f"reader lost rows: {rows_read} read, {table.num_rows} loaded + {len(frame)} quarantined")
    seconds = time.perf_counter() - started
    details = {
        **details,
        **converter.describe(),
        "source": converter.source,
        "rows_read": rows_read,
        "rows_loaded": table.num_rows,
        "rows_quarantined": len(frame),
        "quarantined_by_reason": quarantine.counts(),
        "seconds": round(seconds, 3),
    }
    logger.info(
        "read %s: %d rows (%d quarantined) in %.1fs, %.0f rows/s",
        details["path"], details["rows_read"], len(frame), seconds, details["rows_read"] / max(seconds, 1e-9),
    )
    if len(frame):
        logger.warning("%s: %d rows quarantined: %s", details["path"], len(frame), details["quarantined_by_reason"])
    return ReadResult(table=table, quarantine=frame, details=details)


# --------------------------------------------------------------------------- MovieLens


@dataclass(frozen=True)
class _MovieLensFormat:
    file_name: str
    variants: tuple[str, ...]
    separator: str
    header: str | None
    description: str

    def matches(self, first_line: str) -> bool:
        if self.header is not None:
            return first_line.strip() == self.header
        # The field count is the signature; the values are not checked here, so a
        # bad first line is quarantined like any other line instead of failing the file.
        return len(first_line.split(self.separator)) == len(MOVIELENS_COLUMNS)


MOVIELENS_COLUMNS = ("user", "item", "rating", "timestamp")
MOVIELENS_FORMATS = (
    _MovieLensFormat(
        "u.data", ("ml-100k",), "\t", None,
        "ML-100K u.data: tab-separated 'user item rating timestamp', no header",
    ),
    _MovieLensFormat(
        "ratings.dat", ("ml-1m", "ml-10m"), "::", None,
        "ML-1M/10M ratings.dat: 'user::item::rating::timestamp', no header",
    ),
    _MovieLensFormat(
        "ratings.csv", ("ml-20m", "ml-25m", "ml-32m"), ",", "userId,movieId,rating,timestamp",
        "ML-20M/25M/32M ratings.csv: comma-separated with the header 'userId,movieId,rating,timestamp'",
    ),
)
MOVIELENS_VARIANTS = tuple(variant for fmt in MOVIELENS_FORMATS for variant in fmt.variants)


def _find_ratings_files(directory: Path, formats: list[_MovieLensFormat]) -> list[Path]:
    """Rating files in `directory`, else in its subdirectories (archives unpack into e.g. ml-10M100K/)."""
    names = [fmt.file_name for fmt in formats]
    found = [directory / name for name in names if (directory / name).is_file()]
    if found:
        return found
    subdirectories = sorted(entry for entry in directory.iterdir() if entry.is_dir())
    return [sub / name for sub in subdirectories for name in names if (sub / name).is_file()]


def _locate_movielens(path: Path, variant: str) -> tuple[Path, _MovieLensFormat]:
    formats = [fmt for fmt in MOVIELENS_FORMATS if variant == "auto" or variant in fmt.variants]
    expected = "; ".join(fmt.description for fmt in formats)
    if path.is_dir():
        found = _find_ratings_files(path, formats)
        if not found:
            raise IngestError(
                f"no MovieLens ratings file in {path}: expected "
                f"{' or '.join(fmt.file_name for fmt in formats)} ({expected})"
            )
        if len(found) > 1:
            raise IngestError(f"several MovieLens ratings files under {path}: {[str(p) for p in found]}; "
                              "point ingest.movielens.path at one of them")
        ratings_path = found[0]
    elif path.is_file():
        ratings_path = path
    else:
        raise IngestError(
            f"MovieLens data not found at {path}: fix ingest.movielens.path, or set "
            "ingest.movielens.download: true to fetch it"
        )
    if ratings_path.stat().st_size == 0:
        raise IngestError(f"{ratings_path} is empty (0 bytes)")

    first_line, _ = _peek_first_line(ratings_path)
    named = [fmt for fmt in formats if fmt.file_name == ratings_path.name]
    for fmt in named or formats:
        if fmt.matches(first_line):
            return ratings_path, fmt
    if named:
        raise IngestError(
            f"{ratings_path} does not match the expected format ({named[0].description}): its first line is "
            f"{_describe_line(first_line)}. Was it written with another separator?"
        )
    raise IngestError(
        f"{ratings_path} is not a MovieLens ratings file. Expected {expected}; its first line is "
        f"{_describe_line(first_line)}"
    )


def _variant_label(variant: str, fmt: _MovieLensFormat, ratings_path: Path) -> str:
    if variant != "auto":
        return variant
    if len(fmt.variants) == 1:
        return fmt.variants[0]
    # ratings.dat is ML-1M or ML-10M: the archive folder tells (ml-1m/, ml-10M100K/).
    folder = ratings_path.parent.name.lower()
    return next((known for known in fmt.variants if folder.startswith(known)), "/".join(fmt.variants))


def _has_movielens_data(path: Path, variant: str) -> bool:
    if path.is_file():
        return True
    formats = [fmt for fmt in MOVIELENS_FORMATS if variant == "auto" or variant in fmt.variants]
    return path.is_dir() and bool(_find_ratings_files(path, formats))


def read_movielens(cfg: MovieLensConfig) -> ReadResult:
    """Read an official MovieLens ratings file (see the module docstring for the formats).

    `cfg.path` is the dataset directory or the ratings file itself. With
    `cfg.download`, a missing dataset is first fetched into `cfg.path`.
    """
    started = time.perf_counter()
    path = Path(cfg.path)
    if cfg.download and not _has_movielens_data(path, cfg.variant):
        download_movielens(_variant_to_download(cfg.variant, path), path, cfg.base_url)
    ratings_path, fmt = _locate_movielens(path, cfg.variant)
    variant = _variant_label(cfg.variant, fmt, ratings_path)

    quarantine = _Quarantine()
    converter = _Converter(
        ColumnMapping(user="user", item="item", timestamp="timestamp", rating="rating"),
        id_type="int", timestamp_unit="s", event_weights=None,
        source=f"movielens:{variant}", quarantine=quarantine,
    )
    if fmt.header is not None:
        data_start, first_line = _peek_first_line(ratings_path)[1], 2
    else:
        data_start, first_line = _bom_length(ratings_path), 1
    layout = _Delimited(MOVIELENS_COLUMNS, fmt.separator, quoted=False)
    logger.info("reading MovieLens %s (%s)", ratings_path, fmt.description)
    tables, counts = _read_delimited(
        ratings_path, layout, data_start=data_start, first_line=first_line, converter=converter, quarantine=quarantine
    )
    details = {
        "format": fmt.file_name, "variant": variant, "path": str(ratings_path), "separator": fmt.separator, **counts,
    }
    only = "it holds only the header line" if fmt.header else "it holds no data lines"
    empty_message = f"{ratings_path} is empty: {only}"
    return _finish(tables, quarantine, converter, details, started=started, empty_message=empty_message)


# --------------------------------------------------------------------------- download


def _variant_to_download(variant: str, path: Path) -> str:
    if variant != "auto":
        return variant
    if path.name.lower() in MOVIELENS_VARIANTS:
        return path.name.lower()
    raise IngestError(
        f"ingest.movielens.download needs to know what to fetch into {path}: set ingest.movielens.variant "
        f"to one of {list(MOVIELENS_VARIANTS)}"
    )


def _open_url(url: str, timeout_s: float):
    try:
        return urllib.request.urlopen(url, timeout=timeout_s)  # noqa: S310 (the URL comes from params.yaml)
    except (urllib.error.URLError, OSError) as err:
        raise IngestError(f"cannot download {url}: {getattr(err, 'reason', err)}") from None


def _fetch_md5(url: str, timeout_s: float) -> str:
    """The checksum file beside the archive: `md5sum` ("<hash>  name") or BSD ("MD5 (name) = <hash>") style."""
    with _open_url(url, timeout_s) as response:
        text = response.read(64 * 1024).decode("ascii", errors="replace")
    match = re.search(r"\b[0-9a-fA-F]{32}\b", text)
    if match is None:
        raise IngestError(f"{url} holds no MD5 checksum (got {text[:80]!r})")
    return match.group(0).lower()


def _download(url: str, target: Path, timeout_s: float) -> str:
    """Stream `url` into `target`; returns the MD5 of what was written."""
    digest = hashlib.md5(usedforsecurity=False)
    with _open_url(url, timeout_s) as response, open(target, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=target.name, leave=False, disable=None) as progress:
            try:
                while block := response.read(DOWNLOAD_BLOCK_BYTES):
                    digest.update(block)
                    out.write(block)
                    progress.update(len(block))
            except OSError as err:
                raise IngestError(f"download of {url} broke off: {err}") from None
    return digest.hexdigest()


def _extract_zip(archive: Path, target: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as bundle:
            for name in bundle.namelist():
                if name.startswith(("/", "\\")) or ".." in Path(name).parts:
                    raise IngestError(f"{archive.name} holds an unsafe path {name!r}; not extracting it")
            bundle.extractall(target)
    except zipfile.BadZipFile as err:
        raise IngestError(f"{archive.name} is not a valid zip archive: {err}") from None


def download_movielens(variant: str, dest_dir: Path, base_url: str, *, timeout_s: float = 60.0) -> Path:
    """Fetch `{base_url}/{variant}.zip`, check it against `{variant}.zip.md5`, unpack it as `dest_dir`.

    Atomic: the archive is downloaded and extracted in a staging directory
    beside `dest_dir` and renamed onto it only once verified and complete, so a
    checksum mismatch or an interrupted download leaves nothing behind. The
    archive's single top folder (ml-100k/) becomes `dest_dir` itself.
    """
    dest_dir = Path(dest_dir)
    if variant not in MOVIELENS_VARIANTS:
        raise IngestError(f"unknown MovieLens variant {variant!r}; expected one of {list(MOVIELENS_VARIANTS)}")
    if dest_dir.exists() and (not dest_dir.is_dir() or any(dest_dir.iterdir())):
        raise IngestError(f"cannot download {variant} into {dest_dir}: it exists and is not an empty directory")
    url = f"{base_url.rstrip('/')}/{variant}.zip"
    expected_md5 = _fetch_md5(f"{url}.md5", timeout_s)
    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s -> %s", url, dest_dir)
    with tempfile.TemporaryDirectory(prefix=f".{dest_dir.name}.download-", dir=dest_dir.parent) as staging_name:
        staging = Path(staging_name)
        archive = staging / f"{variant}.zip"
        actual_md5 = _download(url, archive, timeout_s)
        if actual_md5 != expected_md5:
            raise IngestError(
                f"checksum mismatch for {url}: expected MD5 {expected_md5} (from {url}.md5), got {actual_md5}; "
                "the download was discarded"
            )
        extracted = staging / "extracted"
        _extract_zip(archive, extracted)
        entries = list(extracted.iterdir())
        content = entries[0] if len(entries) == 1 and entries[0].is_dir() else extracted
        if dest_dir.exists():
            dest_dir.rmdir()  # empty, checked above; rename needs the name free
        os.replace(content, dest_dir)
    logger.info("MovieLens %s ready in %s (md5 %s verified)", variant, dest_dir, actual_md5)
    return dest_dir


# --------------------------------------------------------------------------- any CSV / Parquet file

PARQUET_SUFFIXES = {".parquet", ".pq", ".parq"}


def _file_format(path: Path, configured: str) -> str:
    with open(path, "rb") as stream:
        magic = stream.read(4)
    if magic[:2] == b"\x1f\x8b" or magic == b"PK\x03\x04":
        raise IngestError(f"{path} is a compressed archive (gzip/zip); decompress it first")
    if configured != "auto":
        return configured
    return "parquet" if path.suffix.lower() in PARQUET_SUFFIXES or magic == b"PAR1" else "csv"


def _check_mapped_columns(path: Path, columns: ColumnMapping, found: list[str], hint: str = "") -> None:
    mapped = _mapped_columns(columns)
    missing = [name for name in mapped if name not in found]
    if missing:
        raise IngestError(
            f"{path}: column(s) {missing} named in ingest.file.columns are missing; the file has {found}{hint}"
        )


def _read_csv(
    path: Path, cfg: FileConfig, converter: _Converter, quarantine: _Quarantine
) -> tuple[list[pa.Table], dict]:
    quoted = len(cfg.sep) == 1
    first_line, first_line_end = _peek_first_line(path)
    fields = _Delimited(("probe",), cfg.sep, quoted).split(first_line)
    if cfg.header:
        names = [name.strip() for name in fields]
        data_start, first_data_line = first_line_end, 2
        hint = ""
    else:
        names = [str(position) for position in range(len(fields))]
        data_start, first_data_line = _bom_length(path), 1
        hint = " (header is false, so columns are named by position: '0', '1', ...)"
    if len(names) == 1 and len(_mapped_columns(cfg.columns)) > 1:
        hint += (
            f". The first line parses as a single column with sep={cfg.sep!r}: the separator is probably wrong "
            f"(first line: {_describe_line(first_line)})"
        )
    _check_mapped_columns(path, cfg.columns, names, hint)
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise IngestError(f"{path}: the header repeats column name(s) {duplicated}; names must be unique")
    layout = _Delimited(tuple(names), cfg.sep, quoted)
    tables, counts = _read_delimited(
        path, layout, data_start=data_start, first_line=first_data_line, converter=converter, quarantine=quarantine
    )
    return tables, {"separator": cfg.sep, "header": cfg.header, **counts}


def _parquet_locator(rows_table: pa.Table, offset: int) -> Locate:
    """Rows of a batch -> their row index in the file and the row as JSON (its `raw`)."""

    def locate(rows: np.ndarray) -> tuple[np.ndarray, list[str]]:
        records = rows_table.take(pa.array(rows)).to_pylist()
        return offset + rows, [json.dumps(record, default=str, ensure_ascii=False) for record in records]

    return locate


def _read_parquet(path: Path, converter: _Converter) -> tuple[list[pa.Table], dict]:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise IngestError(f"{path} is not a readable Parquet file: {err}") from None
    _check_mapped_columns(path, converter.columns, parquet.schema_arrow.names)
    wanted = _mapped_columns(converter.columns)
    tables: list[pa.Table] = []
    offset = 0
    try:
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=wanted):
            rows_table = pa.Table.from_batches([batch])
            columns = {name: rows_table[name] for name in wanted}
            tables.append(converter.convert(columns, _parquet_locator(rows_table, offset)))
            offset += batch.num_rows
    except (pa.ArrowInvalid, OSError) as err:
        raise IngestError(f"{path}: cannot read Parquet rows after row {offset}: {err}") from None
    return tables, {"data_lines": offset, "blank_lines": 0, "row_groups": parquet.num_row_groups}


def read_file(cfg: FileConfig) -> ReadResult:
    """Read interactions from a CSV or Parquet file, columns mapped by `cfg.columns`.

    Without a header, columns are named by 0-based position ("0", "1", ...).
    Ratings: the `rating` column if mapped; else the `event_weights` weight of
    the `event` column; else 1.0 (implicit feedback). With `event_weights`, an
    event missing from them is quarantined ("unknown_event").
    """
    started = time.perf_counter()
    if cfg.path is None:
        raise IngestError("ingest.file.path is not set: point it at a CSV or Parquet file of interactions")
    path = Path(cfg.path)
    if not path.is_file():
        raise IngestError(f"interactions file not found: {path}")
    if path.stat().st_size == 0:
        raise IngestError(f"{path} is empty (0 bytes)")
    if cfg.event_weights is not None and cfg.columns.event is None:
        raise IngestError("ingest.file.event_weights is set but ingest.file.columns.event is not: map the event column")
    file_format = _file_format(path, cfg.format)

    quarantine = _Quarantine()
    converter = _Converter(
        cfg.columns, id_type=cfg.id_type, timestamp_unit=cfg.timestamp_unit, event_weights=cfg.event_weights,
        source=f"file:{path.name}", quarantine=quarantine,
    )
    logger.info("reading %s as %s", path, file_format)
    if file_format == "parquet":
        tables, counts = _read_parquet(path, converter)
        empty_message = f"{path} is empty: it holds no rows"
    else:
        tables, counts = _read_csv(path, cfg, converter, quarantine)
        only = "it holds only the header line" if cfg.header else "it holds no data lines"
        empty_message = f"{path} is empty: {only}"
    details = {"format": file_format, "path": str(path), "id_type": cfg.id_type, **counts}
    return _finish(tables, quarantine, converter, details, started=started, empty_message=empty_message)
