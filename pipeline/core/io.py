"""Atomic file writes and the standard layout of a work directory.

Every stage writes to a temporary file beside its target and renames it into
place, so a killed stage never leaves a half-written output for the next one.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

PARQUET_COMPRESSION = "zstd"


@dataclass(frozen=True)
class Layout:
    """Where each stage reads and writes, relative to one work directory.

    DVC runs in the project root; each Airflow DAG run gets its own root so runs
    never overwrite each other.
    """

    root: Path

    @property
    def raw_interactions(self) -> Path:
        return self.root / "data" / "raw" / "interactions.parquet"

    @property
    def quarantine_dir(self) -> Path:
        return self.root / "data" / "quarantine"

    @property
    def validated_interactions(self) -> Path:
        return self.root / "data" / "validated" / "interactions.parquet"

    @property
    def features_dir(self) -> Path:
        return self.root / "data" / "features"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    def model_dir(self, run_name: str) -> Path:
        return self.root / "models" / run_name


URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


def is_uri(path: str | Path) -> bool:
    """`s3://bucket/key` and the like (an object store, or file://), not a local path; a Windows drive
    letter (C:/...) has a one-letter scheme and no `//`, so it stays a path."""
    return URI_SCHEME.match(str(path)) is not None


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` on success only."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; swap it in for `target` on success only.

    A reader never sees a mix of old and new files: the old directory is moved
    aside, the new one renamed into place, then the old one deleted.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        backup = target.with_name(f".{target.name}.old")
        if backup.exists():
            shutil.rmtree(backup)
        if target.exists():
            os.replace(target, backup)
        os.replace(tmp, target)
        shutil.rmtree(backup, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(data: Any, target: str | Path) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    return Path(target)


def write_parquet(frame: pd.DataFrame | pa.Table, target: str | Path) -> Path:
    table = frame if isinstance(frame, pa.Table) else pa.Table.from_pandas(frame, preserve_index=False)
    with atomic_path(target) as tmp:
        pq.write_table(table, tmp, compression=PARQUET_COMPRESSION)
    return Path(target)


class BackgroundParquetWriter:
    """A ParquetWriter whose `write_table` hands the table to one thread that encodes and writes it.

    Encoding (zstd) and the write release the GIL, so the caller computes its next table meanwhile: a
    stage that produces and writes chunk by chunk no longer waits for each write (docs/benchmarks.md,
    "Writes in the background"). At most `depth` tables wait, so memory stays bounded; the tables must
    not be changed after they are handed over. A failed write is raised by the next `write_table` or
    by `close`, and the tables after it are not written.
    """

    def __init__(self, writer: pq.ParquetWriter, depth: int = 2) -> None:
        self._writer = writer
        self._queue: queue.Queue[pa.Table | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="parquet-writer", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while (table := self._queue.get()) is not None:
            if self._error is None:  # after a failure, keep taking tables so write_table never blocks
                try:
                    self._writer.write_table(table)
                except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
                    self._error = error

    def write_table(self, table: pa.Table) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(table)

    def close(self, raise_error: bool = True) -> None:
        """Wait for the queued writes, then close the file; `raise_error`: raise a failed write's error."""
        self._queue.put(None)
        self._thread.join()
        self._writer.close()
        if raise_error and self._error is not None:
            raise self._error


@contextlib.contextmanager
def parquet_stream(target: str | Path, schema: pa.Schema) -> Iterator[BackgroundParquetWriter]:
    """A Parquet writer that appends chunks (written in the background) and appears at `target` only
    when every chunk was written and the file closed cleanly."""
    with atomic_path(target) as tmp:
        writer = BackgroundParquetWriter(pq.ParquetWriter(tmp, schema, compression=PARQUET_COMPRESSION))
        try:
            yield writer
        except BaseException:
            writer.close(raise_error=False)  # the body's error is the one to report
            raise
        writer.close()
