"""Typed parsing of source columns: ids, numbers, epoch and ISO 8601 timestamps.

Each parser returns the converted values and a boolean numpy mask of the rows
that could not be converted (None when there are none: the fast path). Nulls
stay null and are never "bad": validate deals with them. Work is column-wise
with pyarrow.compute; the masks let `convert.Converter` quarantine just those rows.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core import schema

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
# pandas writes int columns holding NaN), leading zeros allowed. 18 digits always fit in int64; 19
# digits fit up to INT64_DIGITS (a larger one is bad, as the fast cast of the whole column finds).
INTEGER_ID_PATTERN = r"^\s*(?P<sign>-?)0*(?P<digits>\d{1,19})(?:\.0*)?\s*$"
INT64_DIGITS = {"": str(2**63 - 1), "-": str(2**63)}
NUMBER_PATTERN = r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$"
ISO_DATE_PREFIX = re.compile(r"^\s*\d{4}-\d{1,2}-\d{1,2}")
# Arrow's string casts accept more than the patterns above: hexadecimal integers ("0x1f" -> 31), "nan",
# "inf". The fast path (one cast for the whole column) is taken only when no value holds a character
# outside plain decimal notation, so a value converts the same whatever its neighbours in the column.
_PLAIN_DECIMAL_BYTES = np.zeros(256, dtype=bool)
_PLAIN_DECIMAL_BYTES[np.frombuffer(b"0123456789eE.+- \t\n\r\x0b\x0c", dtype=np.uint8)] = True


def bad_mask(mask: pa.ChunkedArray | pa.Array) -> np.ndarray | None:
    mask = pc.fill_null(mask, False)
    if not pc.any(mask).as_py():
        return None
    return np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool)


def as_strings(values: pa.ChunkedArray) -> pa.ChunkedArray:
    return values if values.type == pa.string() else pc.cast(values, pa.string())


def parse_integer_ids(values: pa.ChunkedArray) -> tuple[pa.ChunkedArray, np.ndarray | None]:
    """Ids declared numeric -> int64."""
    if pa.types.is_integer(values.type):
        return pc.cast(values, pa.int64()), None
    if pa.types.is_floating(values.type):
        # A float id column (pandas writes int columns holding NaN as float):
        # integral values convert, NaN is a missing key (null), anything else is bad.
        integral = pc.and_(pc.equal(values, pc.floor(values)), pc.less(pc.abs(values), 9.2e18))
        bad = bad_mask(pc.and_(pc.invert(integral), pc.invert(pc.is_nan(values))))
        return pc.cast(pc.if_else(integral, values, None), pa.int64()), bad
    strings = as_strings(values)
    if _plain_decimal(strings):
        try:
            return pc.cast(strings, pa.int64()), None
        except pa.ArrowInvalid:
            pass
    parts = pc.extract_regex(strings, INTEGER_ID_PATTERN)
    sign, digits = pc.struct_field(parts, "sign"), pc.struct_field(parts, "digits")
    for prefix, limit in INT64_DIGITS.items():
        too_large = pc.and_(pc.equal(sign, prefix), pc.and_(pc.equal(pc.utf8_length(digits), 19), pc.greater(digits, limit)))
        digits = pc.if_else(pc.fill_null(too_large, False), pa.scalar(None, pa.string()), digits)
    bad = bad_mask(pc.and_(pc.is_valid(strings), pc.is_null(digits)))
    return pc.cast(pc.binary_join_element_wise(sign, digits, ""), pa.int64()), bad


def parse_numbers(values: pa.ChunkedArray) -> tuple[pa.ChunkedArray, np.ndarray | None]:
    """Numbers -> int64 when every value is an integer (exact), else float64."""
    if pa.types.is_integer(values.type):
        return pc.cast(values, pa.int64()), None
    if pa.types.is_floating(values.type) or pa.types.is_decimal(values.type):
        return pc.cast(values, pa.float64()), None
    strings = as_strings(values)
    for target in (pa.int64(), pa.float64()) if _plain_decimal(strings) else ():
        try:
            return pc.cast(strings, target), None
        except pa.ArrowInvalid:
            continue
    is_number = pc.match_substring_regex(strings, NUMBER_PATTERN)
    bad = bad_mask(pc.invert(is_number))
    numbers_only = pc.if_else(pc.fill_null(is_number, False), pc.utf8_trim_whitespace(strings), None)
    try:
        return pc.cast(numbers_only, pa.int64()), bad
    except pa.ArrowInvalid:
        return pc.cast(numbers_only, pa.float64()), bad


def _plain_decimal(strings: pa.ChunkedArray) -> bool:
    """No value holds a character outside plain decimal notation (a scan of the string bytes, no regex)."""
    for chunk in strings.chunks:
        if len(chunk) == 0:
            continue
        _, offsets_buffer, data_buffer = chunk.buffers()
        width = np.int64 if pa.types.is_large_string(chunk.type) else np.int32
        offsets = np.frombuffer(offsets_buffer, dtype=width)[chunk.offset : chunk.offset + len(chunk) + 1]
        data = np.frombuffer(data_buffer, dtype=np.uint8)[offsets[0] : offsets[-1]] if data_buffer else np.empty(0, np.uint8)
        if not _PLAIN_DECIMAL_BYTES[data].all():
            return False
    return True


def parse_datetimes(values: pa.ChunkedArray) -> tuple[pa.ChunkedArray, np.ndarray | None]:
    """ISO 8601 strings (YYYY-MM-DD first) -> UTC. Strings without a zone offset are taken as UTC."""
    strings = as_strings(values)
    # pandas reads "-1" or "2020" as dates too: a value that does not start with a date is bad.
    not_dated = bad_mask(pc.and_(pc.is_valid(strings), pc.invert(pc.match_substring_regex(strings, ISO_DATE_PREFIX.pattern))))
    if not_dated is not None:
        timestamps, bad = parse_datetimes(pc.if_else(pa.array(not_dated), pa.scalar(None, pa.string()), strings))
        return timestamps, not_dated if bad is None else bad | not_dated
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
    bad = bad_mask(pc.and_(pc.is_valid(strings), pc.is_null(timestamps)))
    return timestamps, bad


def native_timestamps(values: pa.ChunkedArray) -> pa.ChunkedArray:
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


def epoch_to_timestamps(numbers: pa.ChunkedArray, unit: str) -> tuple[pa.ChunkedArray, np.ndarray | None]:
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
    return micros.cast(schema.TIMESTAMP_TYPE), bad_mask(out_of_range)


def constant_strings(value: str, n_rows: int) -> pa.Array:
    """`value` n_rows times, as a string array."""
    encoded = value.encode("utf-8")
    if n_rows * len(encoded) >= 2**31:  # beyond int32 offsets: let pyarrow build it
        return pa.repeat(value, n_rows)
    # Laying out the buffers directly is ~2x faster than pa.repeat, which copies value by value.
    offsets = np.arange(n_rows + 1, dtype=np.int32) * np.int32(len(encoded))
    return pa.StringArray.from_buffers(n_rows, pa.py_buffer(offsets), pa.py_buffer(encoded * n_rows))


def looks_like_datetimes(strings: pa.ChunkedArray) -> bool:
    sample = pc.drop_null(strings).slice(0, 1000).to_pylist()
    dated = sum(1 for text in sample if ISO_DATE_PREFIX.match(text))
    return bool(sample) and dated * 2 > len(sample)
