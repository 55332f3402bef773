"""Time to quality against RecBole 1.2.1's SASRec on the same split (issue 13).

    python benchmarks/train_speed.py --mode time-to-quality --datasets ml-100k synthetic-short
    python benchmarks/time_to_quality.py --datasets ml-100k            # the same, directly

For each dataset, in one process and back to back on the same machine:
  1. ingest -> validate -> features with LeanRec's stages (params.yaml + the dataset's overrides);
  2. the interactions the features stage kept exported as a RecBole atomic file (.inter) in a scratch
     directory, each interaction's timestamp replaced by its rank in LeanRec's time order (see
     `export_inter`), so that RecBole's leave-one-out by time (`LS: valid_and_test`, `order: TO`)
     holds out the same last two items per user; the benchmark checks that RecBole's validation
     targets are LeanRec's (their count and a SHA-256 of the sorted (user, item) pairs);
  3. RecBole's SASRec in its own venv (benchmarks/peers/recbole.txt; `--recbole-python`), no filtering,
     max length 50, d 64, 2 blocks, 2 heads, dropout 0.2 (LeanRec's `small` preset), full-ranking
     NDCG@10 on the validation targets after every epoch, its own early stopping;
  4. LeanRec's default recipe through the train stage (`run_train`, params.yaml + overrides), without
     and with curriculum.

The clock of both systems starts before their own loading of the prepared data (RecBole: Config,
create_dataset, data_preparation and model build; LeanRec: run_train's start, which reads
sequences.parquet and builds the model) and stops at the end of each epoch's validation: both count
their data loading and every validation, neither counts ingest / validate / features or the export.
Time to target is the first such epoch end at which validation NDCG@10 >= the target, the target
being the peer's best validation NDCG@10.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.data_pipeline import DATASETS  # noqa: E402
from benchmarks.train_speed import prepare_overrides, time_to_target  # noqa: E402

logger = logging.getLogger("time_to_quality")

PEER_REQUIREMENTS = ROOT / "benchmarks" / "peers" / "recbole.txt"
PEER_RUNNER = ROOT / "benchmarks" / "peers" / "recbole_runner.py"
DEFAULT_PEER_VENV = Path(os.environ.get("LEANREC_RECBOLE_VENV", "/work/venvs/recbole"))

# Each dataset: LeanRec's overrides (ingest and features), and the peer's loss.
# The synthetic-short catalogues' histories: about 9 items per user, flatter popularity than the default.
SHORT_HISTORIES = ["ingest.synthetic.mean_sequence_length=9.0", "ingest.synthetic.popularity_exponent=0.5"]

TTQ_DATASETS: dict[str, dict] = {
    "ml-100k": {"overrides": DATASETS["ml-100k"], "peer_loss": "CE"},
    # A catalogue of 20k+ items with short histories (about 7 training items per user), reproducible by seed:
    # the setting of the issue's real catalogue, against SASRec with BPR and one negative for 20 epochs.
    # 400k generated -> about 275k kept by the 5-core: 21.6k items, 28.9k users, about 7.5 training items each.
    "synthetic-short": {"overrides": ["ingest.synthetic.n_interactions=400000", "ingest.synthetic.n_items=40000",
                                      *SHORT_HISTORIES], "peer_loss": "BPR"},
    # The same generator at twice the size, for the `auto` loss crossover (chunked against sampled softmax):
    # 800k generated -> 553k kept: 43.5k items, 58.1k users, the same histories.
    "synthetic-short-43k": {"overrides": ["ingest.synthetic.n_interactions=800000", "ingest.synthetic.n_items=80000",
                                          *SHORT_HISTORIES], "peer_loss": "BPR"},
    # The 1M-interaction set of `train_speed.py --datasets synthetic-1m` (5k items), peer with CE.
    "synthetic-1m": {"overrides": ["ingest.synthetic.n_interactions=1000000", "ingest.synthetic.n_items=5000"],
                     "peer_loss": "CE"},
}


# ----------------------------------------------------------------------------- same split, same targets


def export_inter(features_dir: Path, out_dir: Path, name: str) -> dict:
    """features_dir/interactions.parquet as RecBole's atomic file out_dir/name/name.inter; its validation targets.

    Tokens are LeanRec's user_idx / item_idx. The timestamp column is each interaction's rank in
    LeanRec's order (rows grouped by user, in time order, ties in the order LeanRec broke them):
    RecBole turns float fields into float32 tensors before it sorts by time, which at epoch
    seconds (1e9 to 2e9) has a resolution of 64 to 128 s and would reorder a user's close interactions,
    and it sorts ties its own way. Ranks below 2**24 are exact in float32.
    """
    table = pq.read_table(features_dir / "interactions.parquet", columns=["user_idx", "item_idx", "split"])
    users = table.column("user_idx").to_numpy()
    items = table.column("item_idx").to_numpy()
    split = table.column("split").cast("string").to_pylist()
    if len(users) >= 2**24:
        raise ValueError(f"{len(users):,} interactions: ranks would not be exact in RecBole's float32 timestamps")
    target = out_dir / name
    target.mkdir(parents=True, exist_ok=True)
    path = target / f"{name}.inter"
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        f.writelines(f"{u}\t{i}\t{rank}\n" for rank, (u, i) in enumerate(zip(users.tolist(), items.tolist(), strict=True)))
    tmp.replace(path)
    valid = [(int(u), int(i)) for u, i, s in zip(users, items, split, strict=True) if s == "valid"]
    return {"path": str(path), "rows": len(users), "users": len(set(users.tolist())), "items": len(set(items.tolist())),
            "n_valid_targets": len(valid), "valid_targets_sha256": targets_sha256(valid)}


def targets_sha256(pairs) -> str:
    """SHA-256 of the sorted (user, item) pairs as JSON: what benchmarks/peers/recbole_runner.py writes for RecBole's."""
    return hashlib.sha256(json.dumps(sorted([int(u), int(i)] for u, i in pairs)).encode()).hexdigest()


def best_record(history: list[dict]) -> dict | None:
    """The first epoch with the highest validation NDCG@10."""
    return max(history, key=lambda r: r["valid_ndcg10"]) if history else None


def peer_config(loss: str, epochs: int, stopping_step: int, data_path: Path, workdir: Path, seed: int) -> dict:
    """RecBole's config: LeanRec's split, metric and `small` shape; RecBole's own defaults elsewhere (batch 2048, lr 1e-3)."""
    config = {
        "data_path": str(data_path), "checkpoint_dir": str(workdir / "saved"), "seed": seed, "reproducibility": True,
        "use_gpu": False, "device": "cpu", "show_progress": False, "state": "WARNING",
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        # No filtering: the data are what LeanRec's features stage kept.
        "filter_inter_by_user_or_item": False, "user_inter_num_interval": None, "item_inter_num_interval": None,
        "val_interval": None, "rm_dup_inter": None,
        "MAX_ITEM_LIST_LENGTH": 50,
        "eval_args": {"split": {"LS": "valid_and_test"}, "group_by": "user", "order": "TO", "mode": "full"},
        "metrics": ["NDCG"], "topk": [10], "valid_metric": "NDCG@10",
        "n_layers": 2, "n_heads": 2, "hidden_size": 64, "inner_size": 256,
        "hidden_dropout_prob": 0.2, "attn_dropout_prob": 0.2,
        "epochs": epochs, "stopping_step": stopping_step, "eval_step": 1,
        "loss_type": loss,
    }
    if loss == "CE":
        config["train_neg_sample_args"] = None
    else:  # BPR with one uniformly drawn negative (RecBole's default sampling)
        config["train_neg_sample_args"] = {"distribution": "uniform", "sample_num": 1, "alpha": 1.0, "dynamic": False,
                                           "candidate_num": 0}
    return config


def ensure_peer_venv(venv: Path) -> Path:
    """The peer's python, the venv made from benchmarks/peers/recbole.txt (+ recbole --no-deps) when missing."""
    python = venv / "bin" / "python"
    if python.exists():
        return python
    logger.info("creating RecBole's venv at %s", venv)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(PEER_REQUIREMENTS)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "recbole==1.2.1"], check=True)
    return python


def run_peer(python: Path, name: str, config: dict, scratch: Path, threads: int, timeout: float,
             budget: float | None = None) -> dict:
    """RecBole in its venv; `budget`: stop after the first epoch that ends past this many seconds."""
    spec = {"dataset": name, "config": config, "workdir": str(scratch), "threads": threads, "time_budget_seconds": budget}
    stem = f"{name}-{config['loss_type']}"
    spec_path, out_path, log_path = scratch / f"{stem}.spec.json", scratch / f"{stem}.out.json", scratch / f"{stem}.log"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.pop("PYTHONPATH", None)  # the peer sees nothing of LeanRec
    with log_path.open("w") as log:
        proc = subprocess.run([str(python), str(PEER_RUNNER), "--spec", str(spec_path), "--out", str(out_path)],
                              stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"RecBole failed (rc {proc.returncode}): {log_path.read_text()[-3000:]}")
    return json.loads(out_path.read_text())


# ----------------------------------------------------------------------------- LeanRec


def run_leanrec(layout, overrides: list[str], run_name: str, extra: list[str]) -> dict:
    """The default recipe (params.yaml) through the train stage; no baselines, no tracking."""
    from pipeline.core.config import load_params
    from pipeline.training.train import run_train

    params = load_params(ROOT / "params.yaml", [*overrides, "tracking.enabled=false", "train.baselines=[]",
                                                f"train.run_name={run_name}", *extra])
    result = run_train(params.train, params.tracking, layout, seed=params.seed)
    history = json.loads((Path(result.run_dir) / "history.json").read_text())
    return {"system": "LeanRec SASRec", "run": run_name, "loss": result_loss(result.run_dir), "seconds": result.seconds,
            "history": history, "parameters": result.parameters, "best_epoch": result.best_epoch}


def result_loss(run_dir: str) -> str:
    return json.loads((Path(run_dir) / "train.json").read_text())["loss_resolved"]


def summarise(row: dict, target: float | None) -> dict:
    best = best_record(row["history"])
    out = {"system": row["system"], "run": row.get("run", "peer"), "loss": row["loss"], "epochs": len(row["history"]),
           "best_epoch": best["epoch"] if best else None, "best_valid_ndcg10": best["valid_ndcg10"] if best else None,
           "seconds_to_best": best["elapsed_seconds"] if best else None, "total_seconds": row["seconds"],
           "median_epoch_train_seconds": sorted(r["train_seconds"] for r in row["history"])[len(row["history"]) // 2]
           if row["history"] else None}
    out["seconds_to_target"] = time_to_target(row["history"], target) if target is not None else None
    return out


def uptime() -> str:
    return Path("/proc/loadavg").read_text().strip()


def run_dataset(dataset: str, args, python: Path | None) -> dict:
    spec = TTQ_DATASETS[dataset]
    overrides = [*spec["overrides"], f"train.num_threads={args.threads}", *args.leanrec_override]
    if dataset == "ml-100k" and args.ml100k:
        overrides.append(f"ingest.movielens.path={args.ml100k}")
    with tempfile.TemporaryDirectory(prefix=f"leanrec-ttq-{dataset}-") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        layout, seed = prepare_overrides(overrides, tmp / "leanrec")
        out: dict = {"prepare_seconds": time.perf_counter() - started, "load": {"start": uptime()}}
        name = f"leanrec_{dataset.replace('-', '_')}"
        export = export_inter(layout.features_dir, tmp / "recbole_data", name)
        out["export"] = {k: v for k, v in export.items() if k != "path"}
        logger.info("%s: %s", dataset, out["export"])
        runs = []
        if python is not None:
            loss = args.peer_loss or spec["peer_loss"]
            epochs = args.peer_epochs[dataset] if dataset in args.peer_epochs else (20 if loss == "BPR" else 300)
            config = peer_config(loss, epochs, args.peer_stopping_step, tmp / "recbole_data", tmp, seed)
            budget = args.peer_budget.get(dataset)
            peer = run_peer(python, name, config, tmp, args.threads, args.peer_timeout, budget)
            out["peer_check"] = {
                "same_valid_targets": peer["valid_targets_sha256"] == export["valid_targets_sha256"],
                "peer_n_valid_targets": peer["n_valid_targets"], "leanrec_n_valid_targets": export["n_valid_targets"],
                "peer_items": peer["n_items"], "peer_users": peer["n_users"], "peer_train_samples": peer["n_train_samples"],
                "peer_prepare_seconds": peer["prepare_seconds"], "peer_parameters": peer["parameters"],
                "peer_epochs_cap": epochs, "peer_time_budget_s": budget,
                "peer_stopped_by_time_budget": peer["stopped_by_time_budget"]}
            logger.info("%s peer: %s", dataset, out["peer_check"])
            out["load"]["after_peer"] = uptime()
            runs.append(peer)
        runs.append(run_leanrec(layout, overrides, "default", []))
        out["load"]["after_default"] = uptime()
        if not args.no_curriculum:
            runs.append(run_leanrec(layout, overrides, "curriculum", ["train.curriculum.enabled=true"]))
            out["load"]["after_curriculum"] = uptime()
    peer_best = best_record(runs[0]["history"]) if python is not None else None
    target = args.target if args.target is not None else (peer_best["valid_ndcg10"] if peer_best else None)
    out["target_valid_ndcg10"] = target
    out["rows"] = [summarise(r, target) for r in runs]
    out["histories"] = {f"{r['system']} {r.get('run', 'peer')}": r["history"] for r in runs}
    if python is not None:
        peer_row = out["rows"][0]
        for row in out["rows"][1:]:
            t = row["seconds_to_target"]
            row["speedup_vs_peer_to_best"] = peer_row["seconds_to_best"] / t if t else None
            row["speedup_vs_peer_total"] = peer_row["total_seconds"] / t if t else None
    return out


def ratio(row: dict, key: str) -> str:
    return f"{row[key]:.1f}x" if row.get(key) else "-"


def print_table(results: dict) -> None:
    print("\n| dataset | system | loss | epochs | best valid NDCG@10 (epoch) | s to best | s to target | "
          "peer s to best / s to target | peer total s / s to target |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    fmt = lambda v, spec=".1f": format(v, spec) if v is not None else "not reached"  # noqa: E731
    for dataset, r in results.items():
        for row in r["rows"]:
            print(f"| {dataset} | {row['system']} {row['run']} | {row['loss']} | {row['epochs']} | "
                  f"{fmt(row['best_valid_ndcg10'], '.4f')} ({row['best_epoch']}) | {fmt(row['seconds_to_best'])} | "
                  f"{fmt(row['seconds_to_target'])} | {ratio(row, 'speedup_vs_peer_to_best')} | {ratio(row, 'speedup_vs_peer_total')} |")
        print(f"target {dataset}: {fmt(r['target_valid_ndcg10'], '.4f')}; check {r.get('peer_check')}; load {r['load']}")


def parse_pairs(values: list[str]) -> dict[str, int]:
    out = {}
    for value in values:
        name, _, n = value.partition("=")
        out[name] = int(n)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=2, help="torch threads of both systems")
    parser.add_argument("--recbole-python", default=None, help="the peer's python (default: the venv at $LEANREC_RECBOLE_VENV "
                                                                "or /work/venvs/recbole, made when missing)")
    parser.add_argument("--no-peer", action="store_true", help="LeanRec only (e.g. synthetic-1m, curriculum vs none)")
    parser.add_argument("--no-curriculum", action="store_true")
    parser.add_argument("--peer-loss", choices=["CE", "BPR"], default=None, help="default: the dataset's (ml-100k CE, "
                                                                                  "synthetic-short BPR)")
    parser.add_argument("--peer-epochs", nargs="*", default=[], metavar="DATASET=N",
                        help="cap the peer's epochs (default 20 with BPR, RecBole's 300 with CE)")
    parser.add_argument("--peer-budget", nargs="*", default=[], metavar="DATASET=S",
                        help="stop the peer after the first epoch ending past S seconds (a shared machine's deadline)")
    parser.add_argument("--peer-stopping-step", type=int, default=10, help="RecBole's early stopping (its default 10)")
    parser.add_argument("--peer-timeout", type=float, default=3 * 3600)
    parser.add_argument("--target", type=float, default=None, help="default: the peer's best validation NDCG@10")
    parser.add_argument("--ml100k", default=None, help="MovieLens 100K's directory (default: ../shared/data/ml-100k)")
    parser.add_argument("--leanrec-override", nargs="*", default=[], help="extra params overrides for LeanRec's runs")


def run(args) -> dict:
    args.peer_epochs = parse_pairs(args.peer_epochs) if isinstance(args.peer_epochs, list) else args.peer_epochs
    args.peer_budget = parse_pairs(args.peer_budget) if isinstance(args.peer_budget, list) else args.peer_budget
    import torch

    torch.set_num_threads(args.threads)
    python = None if args.no_peer else (Path(args.recbole_python) if args.recbole_python else ensure_peer_venv(DEFAULT_PEER_VENV))
    machine = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(), "threads": args.threads,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_start": uptime()}
    results = {dataset: run_dataset(dataset, args, python) for dataset in args.datasets}
    machine["load_end"] = uptime()
    out = Path(args.out or ROOT / "benchmarks" / "results" / "time_to_quality.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "results": results}, indent=2, default=str) + "\n")
    print(f"\nmachine: {machine}")
    print_table(results)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["ml-100k", "synthetic-short"], choices=list(TTQ_DATASETS))
    parser.add_argument("--out", default=None)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(args)


if __name__ == "__main__":
    main()
