"""Stage `ingest`: a source (synthetic, MovieLens, any CSV/Parquet) -> data/raw/interactions.parquet.

Rows the source cannot be parsed into go to data/quarantine/ingest.parquet with
a reason; reports/ingest.json accounts for every row read.

With `ingest.pseudonymise_users` every user ID is replaced by its keyed pseudonym
(pipeline/data/pseudonym.py) as the rows are read, before anything is written, and a
quarantined row's raw text by its keyed hash: no raw user ID is stored by this or any
later stage.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
from tqdm import tqdm

from pipeline.core import schema
from pipeline.core.config import IngestConfig
from pipeline.core.io import Layout, parquet_stream, write_json, write_parquet
from pipeline.data import pseudonym
from pipeline.data.sources import synthetic

logger = logging.getLogger(__name__)

QUARANTINE_FILE = "ingest.parquet"
REPORT_FILE = "ingest.json"


@dataclass(frozen=True)
class IngestResult:
    source: str
    rows_read: int
    rows_written: int
    rows_quarantined: int
    quarantined_by_reason: dict[str, int]
    output_path: str
    quarantine_path: str
    report_path: str
    seconds: float


def _write_quarantine(quarantine: pd.DataFrame, source: str, target: Path) -> None:
    frame = quarantine.copy()
    frame[schema.QUARANTINE_STAGE] = "ingest"
    frame[schema.SOURCE] = source
    write_parquet(frame, target)


def _pseudonymised(table: pa.Table, key: bytes | None) -> pa.Table:
    """The table with its user IDs replaced by their pseudonyms (a string column); unchanged without a key."""
    if key is None:
        return table
    position = table.schema.get_field_index(schema.USER)
    users = pa.array(pseudonym.pseudonymise(table.column(position).to_pylist(), key), pa.string())
    return table.set_column(position, pa.field(schema.USER, pa.string(), nullable=table.schema.field(position).nullable), users)


def _ingest_synthetic(cfg: IngestConfig, layout: Layout, seed: int, key: bytes | None) -> tuple[int, pd.DataFrame, dict]:
    rows = 0
    target_schema = schema.raw_schema(pa.int64())
    if key is not None:
        target_schema = target_schema.set(0, pa.field(schema.USER, pa.string()))
    with parquet_stream(layout.raw_interactions, target_schema) as writer:
        chunks = synthetic.generate(cfg.synthetic, seed)
        for table in tqdm(chunks, total=synthetic.n_chunks_for(cfg.synthetic), desc="synthetic", unit="chunk", disable=None):
            writer.write_table(_pseudonymised(table, key).cast(target_schema))
            rows += table.num_rows
    empty = pd.DataFrame({"line": pd.Series(dtype="int64"), "raw": pd.Series(dtype="str"), "reason": pd.Series(dtype="str")})
    return rows, empty, {"generator": cfg.synthetic.model_dump(mode="json"), "seed": seed}


def _ingest_from_reader(cfg: IngestConfig, layout: Layout, key: bytes | None) -> tuple[int, pd.DataFrame, dict]:
    # Imported here so the synthetic path does not pay for the readers' imports.
    from pipeline.data.sources import files, movielens

    if cfg.source == "movielens":
        result = movielens.read_movielens(cfg.movielens)
    else:
        result = files.read_file(cfg.file)
    quarantine = result.quarantine
    if key is not None and len(quarantine):
        quarantine = quarantine.assign(raw=pseudonym.redact(quarantine["raw"].tolist(), key))
    write_parquet(_pseudonymised(result.table, key), layout.raw_interactions)
    return result.table.num_rows, quarantine, result.details


def run_ingest(cfg: IngestConfig, layout: Layout, seed: int) -> IngestResult:
    started = time.perf_counter()
    logger.info("ingest: source=%s -> %s%s", cfg.source, layout.raw_interactions,
                " (user IDs pseudonymised)" if cfg.pseudonymise_users else "")
    key = pseudonym.load_key() if cfg.pseudonymise_users else None  # before reading: a missing key fails fast
    if cfg.source == "synthetic":
        rows_written, quarantine, details = _ingest_synthetic(cfg, layout, seed, key)
    else:
        rows_written, quarantine, details = _ingest_from_reader(cfg, layout, key)
    details = {**details, "pseudonymised_users": cfg.pseudonymise_users}

    quarantine_path = layout.quarantine_dir / QUARANTINE_FILE
    _write_quarantine(quarantine, cfg.source, quarantine_path)
    by_reason = {str(k): int(v) for k, v in quarantine["reason"].value_counts().items()} if len(quarantine) else {}
    result = IngestResult(
        source=cfg.source,
        rows_read=rows_written + len(quarantine),
        rows_written=rows_written,
        rows_quarantined=len(quarantine),
        quarantined_by_reason=by_reason,
        output_path=str(layout.raw_interactions),
        quarantine_path=str(quarantine_path),
        report_path=str(layout.reports_dir / REPORT_FILE),
        seconds=round(time.perf_counter() - started, 3),
    )
    write_json({**asdict(result), "details": details}, result.report_path)
    if result.rows_quarantined:
        logger.warning(
            "ingest: %d of %d rows quarantined (%s) -> %s",
            result.rows_quarantined, result.rows_read, by_reason, quarantine_path,
        )
    logger.info("ingest: wrote %d rows in %.1fs", rows_written, result.seconds)
    return result
