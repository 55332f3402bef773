"""The README's first command on a fresh clone, as a new user runs it: install time, then `dvc repro` stage by stage.

    python benchmarks/first_run.py --workdir /tmp/leanrec-first-run
    python benchmarks/first_run.py --workdir /tmp/leanrec-first-run --repeats 3 --test-install

The clone is of this repository's HEAD (committed files only). pip gets an empty cache of its own,
as on a new machine. Each stage's time runs from DVC's "Running stage" line to the next one (the
last to the end of `dvc repro`), so DVC's own hashing counts with the stage it precedes. A repeat
first resets the clone to its committed state (`git clean -fdx` keeping the venv: no outputs, no DVC
cache, no MLflow store), so every run is a first run with the install already done. The
champion's and the baselines' NDCG@10 come from the run's reports/summary.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger("first_run")
ROOT = Path(__file__).resolve().parents[1]
STAGE_LINE = re.compile(r"Running stage '([^']+)'")


def fresh_clone(target: Path) -> None:
    shutil.rmtree(target, ignore_errors=True)
    subprocess.run(["git", "clone", "-q", str(ROOT), str(target)], check=True)


def timed_install(clone: Path, extra: str) -> float:
    """`python3 -m venv .venv && .venv/bin/pip install -c constraints.txt -e <extra>` with an empty pip cache."""
    env = {**os.environ, "PIP_CACHE_DIR": tempfile.mkdtemp(prefix="pip-cache-")}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", ".venv"], cwd=clone, check=True)
    with (clone / "install.log").open("w") as log:
        subprocess.run([".venv/bin/pip", "install", "-c", "constraints.txt", "-e", extra], cwd=clone, env=env,
                       stdout=log, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - started


def reset_clone(clone: Path) -> None:
    """The clone as committed, its venv and install log kept: outputs, DVC cache and MLflow store removed."""
    subprocess.run(["git", "clean", "-fdxq", "-e", ".venv", "-e", "install.log", "-e", "repro.log"], cwd=clone, check=True)
    subprocess.run(["git", "checkout", "-q", "."], cwd=clone, check=True)


def timed_repro(clone: Path) -> dict:
    """`dvc repro` in the clone's venv; the wall time of each stage from DVC's progress lines."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(PATH=f"{clone / '.venv/bin'}:{env['PATH']}", VIRTUAL_ENV=str(clone / ".venv"), GX_ANALYTICS_ENABLED="false")
    starts: list[tuple[str, float]] = []
    started = time.perf_counter()
    with (clone / "repro.log").open("a") as log:
        process = subprocess.Popen(["dvc", "repro"], cwd=clone, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in process.stdout:
            log.write(line)
            match = STAGE_LINE.search(line)
            if match:
                starts.append((match.group(1), time.perf_counter()))
        if process.wait():
            raise SystemExit(f"dvc repro failed: see {clone / 'repro.log'}")
    ended = time.perf_counter()
    stages = {name: round(end - begin, 1) for (name, begin), end in zip(starts, [t for _, t in starts[1:]] + [ended])}
    return {"total_s": round(ended - started, 1), "stages_s": stages}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="where the fresh clone goes (replaced)")
    parser.add_argument("--repeats", type=int, default=1, help="dvc repro runs, each from the committed state")
    parser.add_argument("--test-install", action="store_true", help="also time the README's test install (.[test])")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default: <workdir>.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    fresh_clone(args.workdir)
    result: dict = {"commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                             text=True, check=True).stdout.strip(), "cpus": os.cpu_count()}
    result["install_s"] = round(timed_install(args.workdir, "."), 1)
    logger.info("install: %.1f s", result["install_s"])
    runs = []
    for index in range(args.repeats):
        if index:
            reset_clone(args.workdir)
        runs.append(timed_repro(args.workdir))
        logger.info("dvc repro %d: %.1f s %s", index + 1, runs[-1]["total_s"], runs[-1]["stages_s"])
    result["repro"] = runs
    result["summary"] = json.loads((args.workdir / "reports/summary.json").read_text())
    if args.test_install:
        test_clone = args.workdir.with_name(args.workdir.name + "-test")
        fresh_clone(test_clone)
        result["test_install_s"] = round(timed_install(test_clone, ".[test]"), 1)
        logger.info("test install: %.1f s", result["test_install_s"])
    out = args.out or args.workdir.with_suffix(".json")
    out.write_text(json.dumps(result, indent=2))

    stages = list(runs[0]["stages_s"])
    print(f"\ncommit {result['commit']}; install {result['install_s']} s"
          + (f"; test install {result['test_install_s']} s" if "test_install_s" in result else ""))
    print("| stage | " + " | ".join(f"run {i + 1} s" for i in range(len(runs))) + " | median s |")
    print("| --- |" + " ---: |" * (len(runs) + 1))
    for name in [*stages, "total"]:
        values = [run["total_s"] if name == "total" else run["stages_s"].get(name, 0.0) for run in runs]
        print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in values) + f" | {statistics.median(values):.1f} |")
    summary = result["summary"]
    print(f"\nNDCG@10 (test): chosen {summary['chosen']['variant']} {summary['chosen']['ndcg@10']}, teacher "
          f"{summary['teacher']['ndcg@10']}, popularity {summary['popularity']['ndcg@10']}, bpr {summary['bpr']['ndcg@10']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
