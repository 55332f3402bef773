"""Quality, size and serving cost of the teacher and every compressed variant, side by side.

The same code as `dvc repro` (train -> compress -> evaluate), on a benchmark
dataset: the teacher (SASRec small) is trained once, every variant in
params.yaml `compress.variants` is built from it (pipeline/compression/compress.py), and
all are measured in one process on the same test split and histories with the
same thread count (pipeline/evaluation/compression_report.py): full-ranking NDCG@10/HR@10,
bytes on disk, bytes per item embedding, batch-1 latency p50/p95 and
throughput at batch 256, CPU (and CUDA when present).

    python benchmarks/compression.py --datasets ml-100k
    python benchmarks/compression.py --datasets synthetic-1m -S compress.distill.epochs=8

Writes benchmarks/results/compression-<dataset>.{json,md,png}. `--workdir W` builds in W and keeps it
(`benchmarks/encoder_runtime.py --workdir W` then times the served models there).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.train_speed import COMMON, TRAIN_DATASETS, prepare  # noqa: E402
from pipeline.compression.compress import run_compress  # noqa: E402
from pipeline.core.config import load_params  # noqa: E402
from pipeline.evaluation.compression_report import REPORT_PNG, markdown, measure_models, model_directories  # noqa: E402
from pipeline.evaluation.pareto import pareto_chart  # noqa: E402
from pipeline.training.train import run_train  # noqa: E402


def run(dataset: str, threads: int, overrides: list[str], out_dir: Path, workdir: Path | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"leanrec-compress-{dataset}-") as tmp:
        layout = prepare(dataset, workdir or Path(tmp))
        params = load_params(ROOT / "params.yaml", [*COMMON, *TRAIN_DATASETS[dataset], "train.baselines=[]",
                                                    f"compress.threads={threads}", *overrides])
        started = time.perf_counter()
        run_train(params.train, params.tracking, layout, seed=params.seed)
        train_seconds = time.perf_counter() - started
        built = run_compress(params.compress, layout, params.train.run_name, seed=params.seed)
        directories = model_directories(params.compress, layout, params.train.run_name)
        report = measure_models(directories, layout, params.compress, params.evaluate, params.seed)
        report.update(dataset=dataset, train_seconds=train_seconds,
                      build_seconds={name: r["seconds"] for name, r in built.items()}, overrides=overrides)
        layout.reports_dir.mkdir(parents=True, exist_ok=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"compression-{dataset}.md").write_text(markdown(report), encoding="utf-8")
        pareto_chart(report, layout.reports_dir / REPORT_PNG)
        shutil.copy(layout.reports_dir / REPORT_PNG, out_dir / f"compression-{dataset}.png")
        return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["ml-100k"], choices=list(TRAIN_DATASETS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("-S", dest="overrides", action="append", default=[], help="params override, e.g. compress.distill.epochs=8")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--workdir", type=Path, default=None,
                        help="build in this pipeline root and keep it (one dataset; e.g. for encoder_runtime.py --workdir)")
    args = parser.parse_args()
    if args.workdir is not None and len(args.datasets) != 1:
        parser.error("--workdir takes one dataset")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out_dir = Path(args.out)
    machine = {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
               "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    for dataset in args.datasets:
        report = run(dataset, args.threads, args.overrides, out_dir, args.workdir)
        (out_dir / f"compression-{dataset}.json").write_text(json.dumps({"machine": machine, **report}, indent=2) + "\n")
        sys.stdout.write(f"\n{dataset} ({machine})\n\n{markdown(report)}\n")


if __name__ == "__main__":
    main()
