"""Source columns -> the raw interactions table (`schema.raw_schema`), and the account of the rows set aside.

Quarantine reasons (`ReadResult.quarantine["reason"]`):

    invalid_utf8           the line's bytes are not UTF-8 (`raw` is their repr())
    stray_carriage_return  a CR inside the line (not the CR of a CRLF ending): it would split the record
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

A row gets the first reason that applies, in this order. The first five are
found by `text` while it splits lines; the rest here, by `Converter`.

Contract with the validate stage: the reader only rejects what it cannot
*parse* (wrong number of fields, undecodable bytes, text where a number is
declared, unknown events). Rows that parse but are wrong (null keys, duplicates,
out-of-range ratings or dates) pass through; validate quarantines them. Every
data line ends up either in `ReadResult.table` or in `ReadResult.quarantine`,
so `details["rows_read"] == table.num_rows + len(quarantine)` (`finish` checks
it). Blank lines are not data lines; they are only counted (`details["blank_lines"]`).

Columns are parsed column-wise by `parse`; a per-row Python loop runs only on
rows that are being quarantined. The timestamp unit ("auto") is decided once,
on the first chunk holding timestamps (see `Converter`), from the magnitude of
the median (`parse.TIMESTAMP_UNIT_THRESHOLDS`).

Without a timestamp column (`columns.timestamp` null: SASRec/RecBole-style `user item` files,
whose lines are in time order), the file's row order is the time: the n-th row handed to conversion
(0-based, in file order, a directory's Parquet files in sorted path order; lines set aside as
unparseable are not counted) gets ROW_ORDER_EPOCH + n seconds. One global, strictly increasing clock, so each user's rows keep
their file order for the leave-one-out split, and the temporal split cuts the file at a row.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core import schema
from pipeline.core.config import ColumnMapping
from pipeline.core.errors import IngestError
from pipeline.data.sources.parse import (
    as_strings,
    bad_mask,
    constant_strings,
    detect_timestamp_unit,
    epoch_to_timestamps,
    looks_like_datetimes,
    native_timestamps,
    parse_datetimes,
    parse_integer_ids,
    parse_numbers,
)

logger = logging.getLogger(__name__)

QUARANTINE_LINE = "line"
QUARANTINE_RAW = "raw"

IdType = Literal["int", "str"]
# The time of a file's first row when the row order is the time (`columns.timestamp` null):
# a fixed instant after validate's default min_timestamp, far enough from 'now' for 10^8 rows.
ROW_ORDER_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)


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


class Quarantine:
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


# --------------------------------------------------------------------------- rows -> raw schema

Locate = Callable[[np.ndarray], tuple[np.ndarray, list[str]]]
"""Row positions in a batch -> (their line numbers / row indexes, their raw text)."""


class Converter:
    """Turns batches of source columns into raw-schema tables, quarantining what does not convert.

    Holds the one decision that must stay fixed across a file's chunks: the
    timestamp unit, taken (when "auto") from the first chunk holding timestamps.
    That chunk is the whole column for files under `text.CHUNK_BYTES` and millions of
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
        quarantine: Quarantine,
    ) -> None:
        self.columns = columns
        self.id_type = id_type
        self.event_weights = dict(event_weights) if event_weights else None
        self.source = source
        self.quarantine = quarantine
        self.schema = schema.raw_schema(pa.int64() if id_type == "int" else pa.string())
        self.timestamp_unit: str | None = None if timestamp_unit == "auto" else timestamp_unit
        self.timestamp_unit_detected = False
        self.rows_converted = 0  # the row-order clock when there is no timestamp column

    def convert(self, batch: Mapping[str, pa.ChunkedArray], locate: Locate) -> pa.Table:
        n_rows = len(batch[self.columns.user])
        problems: list[tuple[str, np.ndarray | None]] = []  # checked in this order: first reason wins

        users, bad = self._ids(batch[self.columns.user])
        problems.append(("non_numeric_user_id", bad))
        items, bad = self._ids(batch[self.columns.item])
        problems.append(("non_numeric_item_id", bad))
        if self.columns.timestamp is None:
            timestamps, timestamp_problems = self._row_order_timestamps(n_rows), []
        else:
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
        return pa.Table.from_arrays([*columns, constant_strings(self.source, n_kept)], schema=self.schema)

    def _ids(self, values: pa.ChunkedArray) -> tuple[pa.ChunkedArray, np.ndarray | None]:
        if self.id_type == "str":
            return as_strings(values), None
        return parse_integer_ids(values)

    def _row_order_timestamps(self, n_rows: int) -> pa.ChunkedArray:
        """ROW_ORDER_EPOCH + n seconds for the n-th row converted (the module docstring says why)."""
        first = int(ROW_ORDER_EPOCH.timestamp()) * 1_000_000 + self.rows_converted * 1_000_000
        self.rows_converted += n_rows
        micros = first + np.arange(n_rows, dtype=np.int64) * 1_000_000
        return pa.chunked_array([pa.array(micros, pa.int64()).cast(schema.TIMESTAMP_TYPE)])

    def _timestamps(self, values: pa.ChunkedArray, n_rows: int) -> tuple[pa.ChunkedArray, list]:
        if pa.types.is_timestamp(values.type) or pa.types.is_date(values.type):
            return native_timestamps(values), []
        is_text = pa.types.is_string(values.type) or pa.types.is_large_string(values.type)
        if self.timestamp_unit is None and is_text and looks_like_datetimes(values):
            self._detected_unit("datetime")
        if self.timestamp_unit == "datetime":
            if not is_text:
                raise IngestError(
                    f"timestamp_unit is 'datetime' but column {self.columns.timestamp!r} holds {values.type}, "
                    "not date strings; set timestamp_unit to s/ms/us/ns or auto"
                )
            timestamps, bad = parse_datetimes(values)
            return timestamps, [("unparseable_datetime", bad)]

        numbers, bad = parse_numbers(values)
        problems = [("non_numeric_timestamp", bad)]
        if self.timestamp_unit is None:
            if numbers.null_count == len(numbers):
                # Nothing to decide the unit from yet: all null (validate quarantines them).
                return pa.chunked_array([pa.nulls(n_rows, schema.TIMESTAMP_TYPE)]), problems
            self._detected_unit(detect_timestamp_unit(numbers))
        timestamps, out_of_range = epoch_to_timestamps(numbers, self.timestamp_unit)
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
            numbers, bad = parse_numbers(batch[self.columns.rating])
            # safe=False: an integer past 2**24 rounds to the nearest float32 instead of failing the file;
            # a rating out of range is validate's to quarantine.
            ratings = pc.cast(numbers, pa.float32(), safe=False)
            problems.append(("non_numeric_rating", bad))
        if self.event_weights is not None:
            events = as_strings(batch[self.columns.event])
            position = pc.index_in(events, value_set=pa.array(list(self.event_weights), pa.string()))
            problems.append(("unknown_event", bad_mask(pc.is_null(position))))
            if ratings is None:
                weights = pa.array(list(self.event_weights.values()), pa.float32())
                ratings = pc.take(weights, position)
        if ratings is None:
            # Implicit feedback: every interaction counts once.
            ratings = pa.chunked_array([pa.array(np.ones(n_rows, dtype=np.float32))])
        return ratings, problems

    def describe(self) -> dict:
        if self.columns.timestamp is None:
            return {"timestamp_unit": "row_order", "timestamp_unit_detected": False}
        return {"timestamp_unit": self.timestamp_unit, "timestamp_unit_detected": self.timestamp_unit_detected}


def mapped_columns(columns: ColumnMapping) -> list[str]:
    mapped = [columns.user, columns.item, columns.timestamp, columns.rating, columns.event]
    return list(dict.fromkeys(name for name in mapped if name is not None))


def finish(
    tables: list[pa.Table],
    quarantine: Quarantine,
    converter: Converter,
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
