"""Training speed and quality: SASRec `small` against the baselines, with and without curriculum.

For each dataset: ingest -> validate -> features once, then in the same process
and on the same machine
  1. SASRec (small preset) without curriculum,
  2. SASRec (small preset) with curriculum (sequence length grows over the first epochs),
  3. the popularity and BPR-MF baselines,
and the test-split full-ranking metrics of all of them. Time-to-target is the
wall time until validation NDCG@10 first reaches `--target-fraction` of the
best value the no-curriculum run reached.

On a CUDA machine `--gpu` adds the `large` preset: sequences/s, tokens/s,
peak memory and TFLOP/s in bf16 and fp32.

    python benchmarks/train_speed.py                          # ML-100K and 1M synthetic, CPU
    python benchmarks/train_speed.py --datasets ml-100k
    python benchmarks/train_speed.py --gpu --datasets synthetic-1m
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.data_pipeline import DATASETS  # noqa: E402
from pipeline.core.config import load_params  # noqa: E402
from pipeline.core.io import Layout  # noqa: E402
from pipeline.data.features import run_features  # noqa: E402
from pipeline.data.ingest import run_ingest  # noqa: E402
from pipeline.data.validation import run_validate  # noqa: E402
from pipeline.evaluation.evaluate import run_evaluate  # noqa: E402
from pipeline.training.train import run_train  # noqa: E402

TRAIN_DATASETS = {
    "ml-100k": DATASETS["ml-100k"],
    # Patience 3 (the params.yaml default) keeps this run inside ~45 minutes on 2 cores.
    "synthetic-1m": ["ingest.synthetic.n_interactions=1000000", "ingest.synthetic.n_items=5000", "train.early_stopping_patience=3"],
}
COMMON = ["tracking.enabled=false", "train.epochs=200", "train.early_stopping_patience=5"]


def time_to_target(history: list[dict], target: float) -> float | None:
    for record in history:
        if record["valid_ndcg10"] >= target:
            return record["elapsed_seconds"]
    return None


def prepare(dataset: str, workdir: Path) -> Layout:
    params = load_params(ROOT / "params.yaml", TRAIN_DATASETS[dataset])
    layout = Layout(workdir)
    run_ingest(params.ingest, layout, seed=params.seed)
    run_validate(params.validate_, layout)
    run_features(params.features, layout)
    return layout


def train_and_test(layout: Layout, dataset: str, run_name: str, extra: list[str]) -> dict:
    params = load_params(ROOT / "params.yaml", [*COMMON, *TRAIN_DATASETS[dataset], f"train.run_name={run_name}", *extra])
    started = time.perf_counter()
    result = run_train(params.train, params.tracking, layout, seed=params.seed)
    wall = time.perf_counter() - started
    report = run_evaluate(params.evaluate, params.train, params.tracking, layout, seed=params.seed)
    best = max(result.history, key=lambda r: r["valid_ndcg10"]) if result.history else None
    return {
        "wall_seconds": wall,
        "epochs": result.epochs_run,
        "best_epoch": result.best_epoch,
        "seconds_to_best": best["elapsed_seconds"] if best else None,
        "best_valid_ndcg10": result.best_valid_ndcg10,
        "history": result.history,
        "test": {name: {k: v for k, v in m.items() if k.startswith("full/")} for name, m in report["models"].items()},
        "parameters": result.parameters,
    }


def gpu_large(layout: Layout, dataset: str) -> dict:
    out = {}
    for precision in ("bf16", "fp32"):
        name = f"large-{precision}"
        params = load_params(ROOT / "params.yaml", [
            *TRAIN_DATASETS[dataset], "tracking.enabled=false", "train.preset=large", "train.epochs=2",
            "train.early_stopping_patience=10", f"train.precision={precision}", "train.device=cuda",
            "train.baselines=[]", f"train.run_name={name}", "train.batch_size=256",
        ])
        result = run_train(params.train, params.tracking, layout, seed=params.seed)
        last = result.history[-1]  # the second epoch: warm caches, no first-call compilation
        out[precision] = {k: last.get(k) for k in ("sequences_per_s", "tokens_per_s", "peak_memory_mib", "tflops", "train_seconds")}
        out[precision]["parameters"] = result.parameters
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(TRAIN_DATASETS), choices=list(TRAIN_DATASETS))
    parser.add_argument("--target-fraction", type=float, default=0.95)
    parser.add_argument("--gpu", action="store_true", help="also the large preset on CUDA (bf16 vs fp32)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_speed.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    machine = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
               "threads": torch.get_num_threads(), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    results = {}
    for dataset in args.datasets:
        with tempfile.TemporaryDirectory(prefix=f"leanrec-train-{dataset}-") as tmp:
            layout = prepare(dataset, Path(tmp))
            plain = train_and_test(layout, dataset, "plain", [])
            curriculum = train_and_test(layout, dataset, "curriculum", ["train.curriculum.enabled=true", "train.baselines=[]"])
            target = args.target_fraction * plain["best_valid_ndcg10"]
            t_plain, t_curr = time_to_target(plain["history"], target), time_to_target(curriculum["history"], target)
            results[dataset] = {
                "plain": plain, "curriculum": curriculum, "target_valid_ndcg10": target,
                "time_to_target_plain_s": t_plain, "time_to_target_curriculum_s": t_curr,
                "curriculum_speedup": (t_plain / t_curr) if t_plain and t_curr else None,
            }
            if args.gpu and device == "cuda":
                results[dataset]["gpu_large"] = gpu_large(layout, dataset)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine, "results": results}, indent=2, default=str) + "\n")

    print(f"\nmachine: {machine}\n")
    print("| dataset | model | epochs | time to best s | total train s | test NDCG@10 | test HR@10 |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for dataset, r in results.items():
        plain = r["plain"]
        for name, metrics in plain["test"].items():
            if name == "sasrec":
                row = (plain["epochs"], f"{plain['seconds_to_best']:.1f}", f"{plain['wall_seconds']:.1f}")
            else:
                row = ("-", "-", "-")
            print(f"| {dataset} | {name} | {row[0]} | {row[1]} | {row[2]} | {metrics['full/NDCG@10']:.4f} | {metrics['full/HR@10']:.4f} |")
        c = r["curriculum"]
        print(f"| {dataset} | sasrec + curriculum | {c['epochs']} | {c['seconds_to_best']:.1f} | {c['wall_seconds']:.1f} | "
              f"{c['test']['sasrec']['full/NDCG@10']:.4f} | {c['test']['sasrec']['full/HR@10']:.4f} |")
    print("\n| dataset | target valid NDCG@10 | time to target, plain s | with curriculum s | speed-up |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for dataset, r in results.items():
        fmt = lambda v: f"{v:.1f}" if v is not None else "not reached"  # noqa: E731
        speedup = f"{r['curriculum_speedup']:.2f}x" if r["curriculum_speedup"] else "-"
        plain, curriculum = fmt(r["time_to_target_plain_s"]), fmt(r["time_to_target_curriculum_s"])
        print(f"| {dataset} | {r['target_valid_ndcg10']:.4f} | {plain} | {curriculum} | {speedup} |")
    for dataset, r in results.items():
        for precision, g in r.get("gpu_large", {}).items():
            print(f"GPU large {dataset} {precision}: {g}")


if __name__ == "__main__":
    main()
