"""The sharded item table (train.embedding_engine=torchrec) against the dense one: the train stage timed.

On one synthetic dataset, `python -m pipeline train` runs (SASRec small, sampled softmax, the
same seed and epochs) as
  1. torch, one process;            2. torch, two processes (DDP, each rank a whole table);
  3. torchrec, one process (one shard: TorchRec's overhead alone);
  4. torchrec, two processes (each rank half the table rows).
Each run's history.json gives the seconds of its training epochs (validation excluded),
tokens/s, peak memory of rank 0 and validation NDCG@10. Runs under torchrun get one thread per
process, single processes `--threads`. The table's optimizer differs (AdamW for torch, the fused
exact Adagrad for torchrec), so NDCG says the runs trained, not which engine trains better.

    python benchmarks/sharded_table.py                       # 200k interactions, 3,000 items, 2 epochs
    python benchmarks/sharded_table.py --items 20000 --epochs 3
    python benchmarks/sharded_table.py --runs torch-1 --table-lrs 0.002 0.01 0.05 0.1   # the table's Adagrad lr

Writes benchmarks/results/sharded_table.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.core.config import load_params  # noqa: E402
from pipeline.core.io import Layout  # noqa: E402
from pipeline.data.features import run_features  # noqa: E402
from pipeline.data.ingest import run_ingest  # noqa: E402
from pipeline.data.validation import run_validate  # noqa: E402

logger = logging.getLogger("benchmarks.sharded_table")

RUNS = [("torch", 1), ("torch", 2), ("torchrec", 1), ("torchrec", 2)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(layout: Layout, data: list[str], engine: str, processes: int, epochs: int, threads: int,
           table_lr: float | None = None) -> dict:
    run_name = f"{engine}-{processes}" + (f"-lr{table_lr:g}" if table_lr else "")  # no table_lr: params.yaml's
    overrides = [*data, *([f"train.sharded_table_lr={table_lr}"] if table_lr else []),
                 "tracking.enabled=false", "train.baselines=[]", "train.loss=sampled_softmax", f"train.epochs={epochs}",
                 "train.early_stopping_patience=100", f"train.embedding_engine={engine}", f"train.run_name={run_name}",
                 f"train.num_threads={threads if processes == 1 else 1}"]
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={processes}", "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}"]
    command = [*launcher, "-m", "pipeline", "train", "--workdir", str(layout.root)]
    for override in overrides:
        command += ["-S", override]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads if processes == 1 else 1), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{run_name} failed:\n{proc.stderr[-3000:]}")
    history = json.loads((layout.model_dir(run_name) / "history.json").read_text())
    shards = [line.split("pipeline.training.sharded: ")[1] for line in proc.stderr.splitlines() if "holds rows" in line]
    return {
        "engine": engine, "processes": processes, "table_lr": table_lr, "epoch_train_seconds": [r["train_seconds"] for r in history],
        "tokens_per_s": [r["tokens_per_s"] for r in history], "peak_memory_mib_rank0": max(r["peak_memory_mib"] for r in history),
        "valid_ndcg10": [r["valid_ndcg10"] for r in history], "shards": sorted(shards),
    }


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interactions", type=int, default=200_000)
    parser.add_argument("--items", type=int, default=3_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="threads of a single-process run")
    parser.add_argument("--table-lrs", type=float, nargs="*", default=[],
                        help="also train torchrec on one process with each train.sharded_table_lr (the table's Adagrad lr)")
    parser.add_argument("--runs", nargs="*", default=[f"{e}-{n}" for e, n in RUNS], help="which of the four runs, as engine-processes")
    args = parser.parse_args()
    data = [f"ingest.synthetic.n_interactions={args.interactions}", f"ingest.synthetic.n_items={args.items}"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        params = load_params(ROOT / "params.yaml", data)
        layout = Layout(Path(tmp))
        run_ingest(params.ingest, layout, seed=params.seed)
        run_validate(params.validate_, layout)
        run_features(params.features, layout)
        runs = [(e, n, None) for e, n in RUNS if f"{e}-{n}" in args.runs] + [("torchrec", 1, lr) for lr in args.table_lrs]
        for engine, processes, table_lr in runs:
            result = _train(layout, data, engine, processes, args.epochs, args.threads, table_lr)
            logger.info("%s x%d (table lr %s): epoch train seconds %s, tokens/s %s, peak rank-0 memory %.0f MiB, valid NDCG@10 %s %s",
                        engine, processes, table_lr, [f"{s:.1f}" for s in result["epoch_train_seconds"]],
                        [f"{t:.0f}" for t in result["tokens_per_s"]], result["peak_memory_mib_rank0"],
                        [f"{v:.4f}" for v in result["valid_ndcg10"]], result["shards"])
            results.append(result)
    out = ROOT / "benchmarks" / "results" / "sharded_table.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "cpus": os.cpu_count(), "machine": platform.platform(), "runs": results}, indent=2))
    logger.info("wrote %s", out)


if __name__ == "__main__":
    main()
