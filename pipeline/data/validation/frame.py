"""The pandas frame GX validates, and the duplicate pre-filter its uniqueness check is conditioned on."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core import schema

from .rules import KEY_HASH_REPEATED, ROW_ID

_ARROW_INT_TO_PANDAS = {
    pa.int8(): pd.Int8Dtype(),
    pa.int16(): pd.Int16Dtype(),
    pa.int32(): pd.Int32Dtype(),
    pa.int64(): pd.Int64Dtype(),
    pa.uint8(): pd.UInt8Dtype(),
    pa.uint16(): pd.UInt16Dtype(),
    pa.uint32(): pd.UInt32Dtype(),
    pa.uint64(): pd.UInt64Dtype(),
}


def gx_frame(table: pa.Table) -> pd.DataFrame:
    """The frame GX validates: the contract's columns with dtypes that keep the Arrow types apart,
    and `ROW_ID` (the row's position in `table`) as its named index.

    Integers map to nullable pandas integers (not to float64 when they hold nulls), strings
    to `StringDtype`, the null type to an Arrow-backed dtype that no type check accepts;
    floats reach GX as float64 (exact for float32): GX's between check runs a Python function
    per value unless the dtype is exactly int64/float64 or datetime. Columns outside the
    contract are not validated and not converted.
    """
    sub = table.select([c for c in schema.RAW_COLUMNS if c in table.column_names])
    for i, field in enumerate(sub.schema):
        if pa.types.is_floating(field.type) and field.type != pa.float64():
            sub = sub.set_column(i, field.name, pc.cast(sub.column(i), pa.float64()))

    def mapper(arrow_type: pa.DataType) -> Any:
        if arrow_type in _ARROW_INT_TO_PANDAS:
            return _ARROW_INT_TO_PANDAS[arrow_type]
        if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
            return pd.StringDtype()
        if pa.types.is_null(arrow_type):
            return pd.ArrowDtype(arrow_type)
        return None

    frame = sub.to_pandas(types_mapper=mapper)
    frame.index = pd.RangeIndex(table.num_rows, name=ROW_ID)
    return frame


def add_duplicate_candidates(table: pa.Table, frame: pd.DataFrame) -> None:
    """Add `KEY_HASH_REPEATED`, the rows GX's uniqueness check is conditioned on, to `frame`."""
    frame[KEY_HASH_REPEATED] = _duplicate_candidates(table, frame)


def _duplicate_candidates(table: pa.Table, frame: pd.DataFrame) -> np.ndarray:
    if not set(schema.KEY_COLUMNS) <= set(frame.columns):
        return np.zeros(table.num_rows, dtype=bool)  # the batch fails on the missing column
    complete = ~np.logical_or.reduce([frame[c].isna().to_numpy() for c in schema.KEY_COLUMNS])
    try:
        return key_hash_repeated(table, complete)
    except TypeError:  # a key column of a type the type checks reject; GX checks all complete rows
        return complete


def _string_tail_feature(chunk: pa.Array) -> np.ndarray:
    """uint64 per string: its last (up to) 8 bytes, mixed with its byte length.

    Read straight from the Arrow offsets and data buffers: a gather of 8 bytes per row,
    where hashing every string (pandas or a dictionary encode) takes seconds at 10M rows.
    """
    n = len(chunk)
    offset_type = np.int64 if pa.types.is_large_string(chunk.type) else np.int32
    _, offsets_buf, data_buf = chunk.buffers()
    if n == 0 or offsets_buf is None:
        return np.zeros(n, dtype=np.uint64)
    offsets = np.frombuffer(offsets_buf, dtype=offset_type)[chunk.offset : chunk.offset + n + 1].astype(np.int64)
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, dtype=np.uint8)
    padded = np.concatenate([np.zeros(8, dtype=np.uint8), data])  # so a window never starts before 0
    windows = np.lib.stride_tricks.sliding_window_view(padded, 8)  # windows[e] = data[e - 8 : e]
    end = offsets[1:]
    length = end - offsets[:-1]
    tail = np.ascontiguousarray(windows[end]).view("<u8").ravel()  # last byte most significant
    kept = np.minimum(length, 8)
    tail = np.where(kept > 0, tail >> (8 * (8 - kept)).astype(np.uint64), np.uint64(0))  # drop the previous string's bytes
    return tail * np.uint64(0x9E3779B97F4A7C15) ^ length.astype(np.uint64)


def _key_feature(column: pa.ChunkedArray) -> np.ndarray:
    """uint64 per row, equal for equal values (anything under a null).

    Integers and timestamps give their value, strings `_string_tail_feature`.
    """
    arrow_type = column.type
    if pa.types.is_integer(arrow_type) or pa.types.is_timestamp(arrow_type):
        values = column if pa.types.is_integer(arrow_type) else pc.cast(column, pa.int64())
        return np.asarray(values.fill_null(0).to_numpy(), dtype=np.int64).view(np.uint64)
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        parts = [_string_tail_feature(chunk) for chunk in column.chunks]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)
    raise TypeError(f"no key feature for Arrow type {arrow_type}")


def key_hash_repeated(table: pa.Table, complete: np.ndarray) -> np.ndarray:
    """True for the complete-key rows whose (user, item, timestamp) hash is not unique.

    A superset of the duplicated rows, since equal keys hash equal: it only narrows the rows
    GX's uniqueness check looks at, GX decides which of them are duplicates. The combination
    only has to be deterministic; its spread just decides how few unique keys collide.
    Sort-based: sorting 10M uint64 takes well under a second, a hash table over 10M keys seconds.
    """
    out = np.zeros(table.num_rows, dtype=bool)
    if not complete.any():
        return out
    user, item, ts = (_key_feature(table.column(c)) for c in schema.KEY_COLUMNS)
    h = user * np.uint64(0xBF58476D1CE4E5B9)
    h ^= item
    h *= np.uint64(0x94D049BB133111EB)
    h ^= ts
    h = h[complete]
    ordered = np.sort(h)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if repeated.size:
        out[complete] = pd.Series(h).isin(np.unique(repeated)).to_numpy()
    return out
