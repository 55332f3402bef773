"""Wall time and peak memory of ingest -> validate -> features.

Each dataset runs in its own child process, so its peak resident memory
(ru_maxrss of that process alone) is measured cleanly; times are per stage.

    python benchmarks/data_pipeline.py                       # 1M, 10M synthetic and ML-100K
    python benchmarks/data_pipeline.py --datasets synthetic-1m --repeats 3
    python benchmarks/data_pipeline.py --datasets synthetic-1m synthetic-10m --engines pandas duckdb
    python benchmarks/data_pipeline.py --datasets synthetic-1m synthetic-10m --engines spark duckdb
    python benchmarks/data_pipeline.py --datasets synthetic-10m --engines duckdb pandas --baseline-rev d665d33 --repeats 3

--baseline-rev runs an older revision's own copy of this script (its pipeline, its params.yaml, its
defaults) in the same run, from a `git archive` of that revision: "faster than before" measured side
by side, not against a figure from another day. d665d33 is the last revision before the out-of-core
engines (the parent of the first commit of pipeline/data/duckdb_session.py): the pandas path of
milestone 1.

Peak RSS is the child Python process's own (ru_maxrss, exact); with data_engine spark the JVM is a
process of its own (spark.driver_memory caps its heap), so a second figure, the child's whole process
tree (it and every descendant, the JVM included), is sampled every 0.2 s (psutil): a lower bound
on its true peak, which a sample can miss.

Results are printed as a markdown table and written to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ML100K = ROOT.parent / "shared" / "data" / "ml-100k"

DATASETS: dict[str, list[str]] = {
    "synthetic-1m": ["ingest.synthetic.n_interactions=1000000", "ingest.synthetic.n_items=20000"],
    "synthetic-10m": ["ingest.synthetic.n_interactions=10000000", "ingest.synthetic.n_items=50000"],
    "synthetic-100m": ["ingest.synthetic.n_interactions=100000000", "ingest.synthetic.n_items=100000"],
    "ml-100k": [
        "ingest.source=movielens",
        f"ingest.movielens.path={ML100K}",
        # MovieLens 100K: every rating is an interaction (as in SASRec papers and RecBole).
        "features.min_rating=null",
        "validate.min_timestamp=1990-01-01T00:00:00Z",
    ],
}


def run_child(overrides: list[str], workdir: str) -> None:
    """Runs in the child: the three stages, timed, printed as one JSON line."""
    from pipeline.core.config import load_params
    from pipeline.core.io import Layout
    from pipeline.data.features_outofcore import run_features_on
    from pipeline.data.ingest import run_ingest
    from pipeline.data.validation import run_validate

    logging.basicConfig(level=logging.WARNING)
    params = load_params(ROOT / "params.yaml", overrides)
    layout = Layout(Path(workdir))
    seconds = {}
    started = time.perf_counter()
    ingest = run_ingest(params.ingest, layout, seed=params.seed)
    seconds["ingest"] = time.perf_counter() - started
    mark = time.perf_counter()
    validation = run_validate(params.validate_, layout, engine=params.data_engine, spark=params.spark)
    seconds["validate"] = time.perf_counter() - mark
    mark = time.perf_counter()
    features = run_features_on(params.data_engine, params.features, layout, params.spark)
    seconds["features"] = time.perf_counter() - mark
    seconds["total"] = time.perf_counter() - started
    print(json.dumps({
        "seconds": seconds,
        "rows_ingested": ingest.rows_written,
        "rows_validated": validation.rows_passed,
        "rows_quarantined": ingest.rows_quarantined + validation.rows_quarantined,
        "features": {k: features.stats[k] for k in ("users", "items", "interactions")},
    }))


def _sample_tree_rss(pid: int, stop: threading.Event, peak: list[int]) -> None:
    """peak[0] = the largest summed RSS of process `pid` and its descendants seen, sampled every 0.2 s."""
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    while not stop.is_set():
        total = 0
        for process in [root, *root.children(recursive=True)]:
            try:
                total += process.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue  # exited between the listing and the read
        peak[0] = max(peak[0], total)
        stop.wait(0.2)


def measure(name: str, repeats: int, engine: str) -> dict:
    runs = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix=f"leanrec-bench-{name}-") as workdir:
            # This checkout's pipeline first: an editable install may point at another checkout.
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
            proc = subprocess.Popen(
                [sys.executable, __file__, "--child", workdir, *DATASETS[name], f"data_engine={engine}"],
                stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env,
            )
            stop, tree_peak = threading.Event(), [0]
            sampler = threading.Thread(target=_sample_tree_rss, args=(proc.pid, stop, tree_peak), daemon=True)
            sampler.start()
            out = proc.stdout.read()
            stop.set()
            sampler.join()
            # wait4 gives this child's own rusage: its peak resident memory, nothing else's.
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0:
                raise SystemExit(f"{name}: child failed with exit code {proc.returncode}")
            result = json.loads(out.strip().splitlines()[-1])
            result["peak_rss_mib"] = round(usage.ru_maxrss / 1024, 1)  # ru_maxrss is KiB on Linux
            result["peak_tree_rss_mib"] = round(tree_peak[0] / 2**20, 1)
            runs.append(result)
    totals = [r["seconds"]["total"] for r in runs]
    return {
        "dataset": name,
        "engine": engine,
        "repeats": repeats,
        "median_seconds": {stage: statistics.median(r["seconds"][stage] for r in runs) for stage in runs[0]["seconds"]},
        "all_totals": totals,
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
        "peak_tree_rss_mib": max(r["peak_tree_rss_mib"] for r in runs),
        **{k: runs[0][k] for k in ("rows_ingested", "rows_validated", "rows_quarantined", "features")},
    }


def measure_baseline(rev: str, datasets: list[str], repeats: int) -> list[dict]:
    """`rev`'s own benchmark over `datasets`, run from an extracted copy of that revision."""
    with tempfile.TemporaryDirectory(prefix="leanrec-baseline-") as tree:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
        out = Path(tree) / "baseline.json"
        # Its own pipeline package, not this checkout's (nor an editable install's).
        env = {**os.environ, "PYTHONPATH": tree}
        subprocess.run([sys.executable, str(Path(tree) / "benchmarks" / "data_pipeline.py"), "--datasets", *datasets,
                        "--repeats", str(repeats), "--out", str(out)], cwd=tree, env=env, check=True)
        results = json.loads(out.read_text())["results"]
    for result in results:
        result["engine"] = f"pandas @ {rev}"
        result.setdefault("peak_tree_rss_mib", None)  # older revisions measured the Python process only
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["synthetic-1m", "synthetic-10m", "ml-100k"], choices=list(DATASETS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--engines", nargs="+", default=["pandas"], choices=["pandas", "duckdb", "spark"],
                        help="params data_engine")
    parser.add_argument("--baseline-rev", help="also run this git revision's own benchmark on the same datasets, first")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_pipeline.json"))
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child[1:], args.child[0])
        return

    if "ml-100k" in args.datasets and not (ML100K / "u.data").exists():
        raise SystemExit(f"{ML100K}/u.data not found: drop ml-100k from --datasets or provide the data")
    results = measure_baseline(args.baseline_rev, args.datasets, args.repeats) if args.baseline_rev else []
    results += [measure(name, args.repeats, engine) for name in args.datasets for engine in args.engines]
    machine = {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")

    print(f"\nmachine: {machine}\n")
    print("| dataset | engine | rows | ingest s | validate s | features s | total s | peak RSS MiB | with child processes MiB |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        s = r["median_seconds"]
        tree = "-" if r["peak_tree_rss_mib"] is None else f"{r['peak_tree_rss_mib']:,.0f}"
        print(f"| {r['dataset']} | {r['engine']} | {r['rows_ingested']:,} | {s['ingest']:.1f} | {s['validate']:.1f} | "
              f"{s['features']:.1f} | {s['total']:.1f} | {r['peak_rss_mib']:,.0f} | {tree} |")


if __name__ == "__main__":
    main()
