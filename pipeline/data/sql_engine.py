"""The SQL engines of the out-of-core stages (params `data_engine`: duckdb or spark), behind one interface.

validate (`validation/outofcore`) and features (`features_outofcore`) state their row work once, as
SQL that DuckDB and Spark SQL both read (Spark with ANSI double-quoted identifiers,
`spark_session`), and run it through an `SqlEngine`; the few spellings that differ are the
`Dialect`'s. Tables are named: `parquet` makes a view of a file with its row number, and
`materialize` computes a query once (a DuckDB temp table; on Spark a view of a local checkpoint).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa

from pipeline.core.config import SparkConfig

BATCH_ROWS = 1_000_000  # rows per Arrow batch streamed through Python


@dataclass(frozen=True)
class Dialect:
    name: str
    instant_type: str  # the type of a UTC instant literal: TIMESTAMPTZ '2024-01-01T00:00:00+00:00'
    epoch_us: str  # function: timestamp -> microseconds since the epoch
    struct: str  # function: values -> one value ordered by them in turn (for min over ties)


DUCKDB = Dialect("duckdb", instant_type="TIMESTAMPTZ", epoch_us="epoch_us", struct="row")
SPARK = Dialect("spark", instant_type="TIMESTAMP", epoch_us="unix_micros", struct="struct")


class SqlEngine(Protocol):
    dialect: Dialect

    def rows(self, sql: str) -> list[tuple]: ...
    def arrow(self, sql: str) -> pa.Table: ...
    def batches(self, sql: str) -> Iterator[pa.RecordBatch]: ...
    def parquet(self, name: str, path: Path) -> None: ...
    def materialize(self, name: str, sql: str) -> None: ...
    def drop(self, name: str) -> None: ...
    def register(self, name: str, table: pa.Table) -> None: ...


class DuckDBEngine:
    dialect = DUCKDB

    def __init__(self, con: Any) -> None:
        self.con = con

    def rows(self, sql: str) -> list[tuple]:
        return self.con.sql(sql).fetchall()

    def arrow(self, sql: str) -> pa.Table:
        return self.con.sql(sql).arrow().read_all()

    def batches(self, sql: str) -> Iterator[pa.RecordBatch]:
        return iter(self.con.sql(sql).to_arrow_reader(BATCH_ROWS))

    def parquet(self, name: str, path: Path) -> None:
        from pipeline.data.duckdb_session import sql_path

        self.con.execute(f"CREATE OR REPLACE TEMP VIEW {name} AS SELECT * FROM read_parquet({sql_path(path)}, file_row_number = true)")

    def materialize(self, name: str, sql: str) -> None:
        self.con.execute(f"CREATE OR REPLACE TEMP TABLE {name} AS {sql}")

    def drop(self, name: str) -> None:
        self.con.execute(f"DROP TABLE IF EXISTS {name}")

    def register(self, name: str, table: pa.Table) -> None:
        self.con.register(name, table)


class SparkEngine:
    dialect = SPARK

    def __init__(self, spark: Any) -> None:
        self.spark = spark
        self.cached: dict[str, Any] = {}

    def rows(self, sql: str) -> list[tuple]:
        return [tuple(row) for row in self.spark.sql(sql).collect()]

    def arrow(self, sql: str) -> pa.Table:
        return self.spark.sql(sql).toArrow()

    def batches(self, sql: str) -> Iterator[pa.RecordBatch]:
        return iter(self.arrow(sql).to_batches(max_chunksize=BATCH_ROWS))

    def parquet(self, name: str, path: Path) -> None:
        frame = self.spark.read.parquet(str(path.resolve()))  # the JVM's working directory is not Python's
        # _metadata.row_index: the row's position in its file, DuckDB's file_row_number (the stages read one file).
        frame.selectExpr("*", "_metadata.row_index AS file_row_number").createOrReplaceTempView(name)

    def materialize(self, name: str, sql: str) -> None:
        # Computed now and its lineage cut (the k-core passes would stack plans), held by the executors.
        frame = self.spark.sql(sql).localCheckpoint(eager=True)
        self.drop(name)
        frame.createOrReplaceTempView(name)
        self.cached[name] = frame

    def drop(self, name: str) -> None:
        frame = self.cached.pop(name, None)
        if frame is not None:
            frame.unpersist()
        self.spark.catalog.dropTempView(name)

    def register(self, name: str, table: pa.Table) -> None:
        self.spark.createDataFrame(table).createOrReplaceTempView(name)

    def dataframe(self, sql: str) -> Any:
        """The query as a Spark DataFrame (what GX's Spark data source validates)."""
        return self.spark.sql(sql)

    def close(self) -> None:
        for name in list(self.cached):
            self.drop(name)


@contextlib.contextmanager
def connect(engine: str, work_dir: Path, spark: SparkConfig | None = None) -> Iterator[SqlEngine]:
    """An engine for params `data_engine` (duckdb: spill files under `work_dir`; spark: the `spark` settings)."""
    if engine == "duckdb":
        from pipeline.data import duckdb_session

        with duckdb_session.connect(work_dir) as con:
            yield DuckDBEngine(con)
    elif engine == "spark":
        from pipeline.data import spark_session

        sql = SparkEngine(spark_session.session(spark or SparkConfig()))
        try:
            yield sql
        finally:
            sql.close()  # its tables released, the session kept for the next stage
    else:
        raise ValueError(f"no SQL engine {engine!r}: duckdb or spark")
