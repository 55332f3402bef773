"""Incremental updates: which ingested interactions are new, and the merged data to fine-tune on.

An incremental run ingests its source as usual, then:

1. `select_new`: keeps in `data/raw/interactions.parquet` only the rows whose (user, item,
   timestamp) key the reference interactions (what the champion was trained on) do not hold.
   A key anti-join, not a timestamp watermark, so late events with old timestamps still count as
   new. No new rows: the run has nothing to do (the DAG ends as a successful no-op).
2. validate and drift-check the new rows only (`pipeline.data.validation`, `pipeline.data.drift`);
3. `merge_with_reference`: `data/validated/interactions.parquet` becomes the reference plus the
   new validated rows, so users' sequences keep their history; features then extend the
   champion's vocabularies (`features.vocab_from`) and training warm-starts from it
   (`train.init_from`).

Both steps are idempotent: rerunning either on its own output gives the same file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core import schema
from pipeline.core.errors import IngestError
from pipeline.core.io import Layout, write_json, write_parquet

logger = logging.getLogger(__name__)

REPORT_FILE = "incremental.json"


@dataclass
class NewData:
    rows_in: int
    rows_new: int
    rows_known: int
    reference: str

    @property
    def empty(self) -> bool:
        return self.rows_new == 0


def _read(path: Path, what: str) -> pa.Table:
    if not path.exists():
        raise IngestError(f"incremental: {what} {path} not found")
    return pq.read_table(path)


def _check_compatible(reference: pa.Table, batch: pa.Table, path: Path) -> None:
    for column in schema.KEY_COLUMNS:
        if column not in reference.column_names or column not in batch.column_names:
            raise IngestError(f"incremental: {path} and the batch must both hold {list(schema.KEY_COLUMNS)}")
        if reference.schema.field(column).type != batch.schema.field(column).type:
            raise IngestError(
                f"incremental: {column} is {reference.schema.field(column).type} in {path} but "
                f"{batch.schema.field(column).type} in the new data; an incremental run must keep the source's ID type")


def _unseen(batch: pa.Table, reference: pa.Table) -> pa.Table:
    """Rows of `batch` whose (user, item, timestamp) key is not in `reference` (row order kept)."""
    keys = list(schema.KEY_COLUMNS)
    marked = batch.append_column("__row", pa.array(range(batch.num_rows), pa.int64()))
    distinct = reference.select(keys).group_by(keys).aggregate([])
    known = distinct.append_column("__known", pa.array([True] * distinct.num_rows, pa.bool_()))
    joined = marked.join(known, keys=keys, join_type="left outer")
    new_rows = joined.filter(pc.is_null(joined["__known"])).sort_by("__row")["__row"]
    return batch.take(new_rows)


def select_new(layout: Layout, reference: str | Path) -> NewData:
    """Reduce `layout.raw_interactions` to the rows the reference does not hold; report the counts."""
    reference = Path(reference)
    ref, raw = _read(reference, "reference interactions"), _read(layout.raw_interactions, "ingested interactions")
    _check_compatible(ref, raw, reference)
    new = _unseen(raw, ref)
    result = NewData(rows_in=raw.num_rows, rows_new=new.num_rows, rows_known=raw.num_rows - new.num_rows,
                     reference=str(reference))
    write_parquet(new, layout.raw_interactions)
    write_json({**result.__dict__, "empty": result.empty}, layout.reports_dir / REPORT_FILE)
    logger.info("incremental: %d of %d ingested rows are new (%d already in %s)",
                result.rows_new, result.rows_in, result.rows_known, reference)
    return result


def merge_with_reference(layout: Layout, reference: str | Path) -> int:
    """`layout.validated_interactions` := reference + its rows the reference lacks; return the row count."""
    reference = Path(reference)
    ref, new = _read(reference, "reference interactions"), _read(layout.validated_interactions, "validated interactions")
    _check_compatible(ref, new, reference)
    extra = _unseen(new, ref)
    merged = pa.concat_tables([ref.select(new.column_names).cast(new.schema), extra])
    write_parquet(merged, layout.validated_interactions)
    logger.info("incremental: %d reference rows + %d new rows -> %s", ref.num_rows, extra.num_rows, layout.validated_interactions)
    return merged.num_rows
