"""A DuckDB connection for the out-of-core data stages: bounded memory, spilling to disk beyond it.

DuckDB sorts, joins, windows and aggregates out of core: past `MEMORY_LIMIT` it writes to
`spill_dir` instead of growing. The limit is DuckDB's own buffer pool; Arrow batches handed to
Python (`sql_engine.BATCH_ROWS` at a time) come on top of it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import duckdb

MEMORY_LIMIT = os.environ.get("LEANREC_DUCKDB_MEMORY_LIMIT", "4GB")


@contextlib.contextmanager
def connect(work_dir: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory DuckDB whose spill files live in a fresh folder under `work_dir`, removed afterwards."""
    work_dir.mkdir(parents=True, exist_ok=True)
    spill_dir = Path(tempfile.mkdtemp(prefix=".duckdb-spill-", dir=work_dir))
    con = duckdb.connect(config={
        "memory_limit": MEMORY_LIMIT,
        "temp_directory": str(spill_dir),
        "preserve_insertion_order": True,
        "threads": os.cpu_count() or 1,
        # Parquet float min/max statistics leave NaN out, and DuckDB 2.0 trusts them: with these
        # optimizers on, `isnan(rating)` and `rating > 5` are folded to false for a column whose
        # statistics say [1, 5] although it holds a NaN (a NaN rating would pass validation).
        "disabled_optimizers": "statistics_propagation,filter_pushdown",
    })
    try:
        yield con
    finally:
        con.close()
        shutil.rmtree(spill_dir, ignore_errors=True)


def sql_path(path: Path) -> str:
    """A file path as an SQL string literal."""
    return "'" + str(path).replace("'", "''") + "'"
