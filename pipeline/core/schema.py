"""The raw interactions contract shared by ingest (writer) and validate (reader)."""

from __future__ import annotations

import pyarrow as pa

USER = "user_id"
ITEM = "item_id"
TIMESTAMP = "timestamp"
RATING = "rating"
SOURCE = "source"

RAW_COLUMNS = (USER, ITEM, TIMESTAMP, RATING, SOURCE)
KEY_COLUMNS = (USER, ITEM, TIMESTAMP)
TIMESTAMP_TYPE = pa.timestamp("us", tz="UTC")

# Columns of every quarantine file, whichever stage wrote it: what the row was,
# where it came from, and why it was set aside.
QUARANTINE_REASON = "reason"
QUARANTINE_STAGE = "stage"


def raw_schema(id_type: pa.DataType) -> pa.Schema:
    """user_id/item_id keep the source's type (int64 or string); the rest is fixed."""
    return pa.schema(
        [
            pa.field(USER, id_type),
            pa.field(ITEM, id_type),
            pa.field(TIMESTAMP, TIMESTAMP_TYPE),
            pa.field(RATING, pa.float32()),
            pa.field(SOURCE, pa.string()),
        ]
    )
