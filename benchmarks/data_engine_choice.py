"""Which out-of-core engine for the data stages: DuckDB or Polars (lazy, streaming), against pandas.

The same core of the features stage on random interactions (user, item, timestamp, rating):
rating threshold, keep the first (user, item) pair by time, per-user counts, a sort by
(user, time) and a Parquet write. Each engine runs in its own child process, so its peak
resident memory (ru_maxrss) is its own.

    python benchmarks/data_engine_choice.py --rows 1000000 10000000

Polars is not a project dependency: install it outside the venv to run this
(`pip install --target /tmp/polars_probe polars==2.1.0`, then PYTHONPATH=/tmp/polars_probe).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENGINES = ("pandas", "duckdb", "polars")


def make_input(rows: int, path: Path) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    n_users = max(1, rows // 50)
    table = pa.table({
        "user_id": rng.integers(1, n_users + 1, rows),
        "item_id": rng.zipf(1.3, rows) % 50_000 + 1,
        "timestamp": pa.array(rng.integers(1_500_000_000, 1_700_000_000, rows) * 1_000_000, pa.int64()).cast(pa.timestamp("us", "UTC")),
        "rating": rng.choice(np.array([1, 2, 3, 4, 5], np.float32), rows),
    })
    pq.write_table(table, path, compression="zstd")


def run_engine(engine: str, source: Path, target: Path) -> None:
    if engine == "pandas":
        import pandas as pd

        frame = pd.read_parquet(source)
        frame = frame[frame["rating"] >= 3].sort_values(["user_id", "timestamp"], kind="stable")
        frame = frame.drop_duplicates(["user_id", "item_id"], keep="first")
        frame["n_user"] = frame.groupby("user_id")["item_id"].transform("size")
        frame.to_parquet(target, compression="zstd")
    elif engine == "duckdb":
        import duckdb

        con = duckdb.connect()
        con.execute("SET memory_limit = '2GB'; SET preserve_insertion_order = true")
        con.execute(f"""
            COPY (
              WITH kept AS (
                SELECT *, file_row_number AS r FROM read_parquet('{source}', file_row_number = true) WHERE rating >= 3
                QUALIFY row_number() OVER (PARTITION BY user_id, item_id ORDER BY timestamp, r) = 1)
              SELECT user_id, item_id, timestamp, rating, count(*) OVER (PARTITION BY user_id) AS n_user
              FROM kept ORDER BY user_id, timestamp, r
            ) TO '{target}' (FORMAT parquet, COMPRESSION zstd)""")
    else:
        import polars as pl

        kept = (pl.scan_parquet(source).with_row_index("r").filter(pl.col("rating") >= 3)
                .sort(["user_id", "timestamp", "r"]).unique(["user_id", "item_id"], keep="first", maintain_order=True))
        kept.with_columns(pl.len().over("user_id").alias("n_user")).sink_parquet(target, compression="zstd", engine="streaming")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        started = time.perf_counter()
        run_engine(args.child[0], Path(args.child[1]), Path(args.child[2]))
        print(json.dumps({"seconds": time.perf_counter() - started}))
        return
    print("| rows | engine | wall s | peak RSS MiB |\n| ---: | --- | ---: | ---: |")
    for rows in args.rows:
        with tempfile.TemporaryDirectory(prefix="leanrec-engine-choice-") as tmp:
            source = Path(tmp) / "in.parquet"
            make_input(rows, source)
            for engine in args.engines:
                proc = subprocess.Popen([sys.executable, __file__, "--child", engine, str(source), str(Path(tmp) / f"{engine}.parquet")],
                                        stdout=subprocess.PIPE, text=True)
                out = proc.stdout.read()
                _, status, usage = os.wait4(proc.pid, 0)
                if os.waitstatus_to_exitcode(status) != 0:
                    raise SystemExit(f"{engine} failed at {rows} rows")
                seconds = json.loads(out.strip().splitlines()[-1])["seconds"]
                print(f"| {rows:,} | {engine} | {seconds:.1f} | {usage.ru_maxrss / 1024:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
