"""Quality, size and serving cost of the teacher and its compressed variants, side by side.

One process, one machine, one dataset: the teacher (SASRec small) is trained
once, every variant is built from it, and each is evaluated on the same test
split (full ranking) and timed with the same histories and thread count.

    python benchmarks/compression.py --datasets ml-100k
    python benchmarks/compression.py --datasets ml-100k synthetic-1m --threads 2

Variants measured so far: fp16, bf16, int8 and int4 row-wise item tables, int8
Linear layers (torchao) with the int8 table, and low-rank item tables. Pruning
and distillation are still to come (issue 4).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.train_speed import COMMON, TRAIN_DATASETS, prepare  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.efficiency import measure_serving  # noqa: E402
from pipeline.evaluate import evaluate  # noqa: E402
from pipeline.inference import Recommender  # noqa: E402
from pipeline.model import WEIGHTS_FILE, load_model  # noqa: E402
from pipeline.sequences import evaluation_batches, load_sequences  # noqa: E402
from pipeline.train import run_train  # noqa: E402
from pipeline.variants import TORCH_WEIGHTS_FILE, load_variant, save_variant, size_on_disk  # noqa: E402


ROUNDS = 5


def variants_for(d_model: int) -> list[tuple[str, str, int | None]]:
    return [("teacher fp32", "fp32", None), ("fp16", "fp16", None), ("bf16", "bf16", None),
            ("int8 table", "int8_table", None), ("int8 (Linear + table)", "int8", None), ("int4 table", "int4_table", None),
            (f"low-rank {d_model // 2}", "lowrank", d_model // 2), (f"low-rank {d_model // 4}", "lowrank", d_model // 4)]


def _stored_tensors(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / TORCH_WEIGHTS_FILE).exists():
        return torch.load(directory / TORCH_WEIGHTS_FILE, weights_only=True)
    return load_file(str(directory / WEIGHTS_FILE))


def table_bytes_per_item(directory: Path, n_rows: int) -> float:
    state = _stored_tensors(directory)
    table_keys = [k for k in state if k.startswith(("item_embedding.", "table.", "item_factors", "basis"))]
    return sum(state[k].numel() * state[k].element_size() for k in table_keys) / n_rows


def run(dataset: str, threads: int, requests: int) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"leanrec-compress-{dataset}-") as tmp:
        layout = prepare(dataset, Path(tmp))
        params = load_params(ROOT / "params.yaml", [*COMMON, *TRAIN_DATASETS[dataset], "train.baselines=[]"])
        run_train(params.train, params.tracking, layout, seed=params.seed)
        teacher = load_model(layout.model_dir(params.train.run_name))
        data = load_sequences(layout.features_dir)
        batch = next(evaluation_batches(data, "test", 1_000_000, teacher.cfg.max_len))
        histories = [row[: int(n)].tolist() for row, n in zip(batch.inputs, batch.lengths)]
        rows, recommenders = [], []
        for name, kind, rank in variants_for(teacher.cfg.d_model):
            directory = save_variant(teacher, Path(tmp) / "variants" / f"{kind}{rank or ''}", kind, rank)
            model = load_variant(directory)
            quality = evaluate(lambda b, m=model: m.score(b.inputs, b.lengths), data, "test", ks=(10,),
                               max_len=model.cfg.max_len, sampled_strategies=(), seed=params.seed, progress=False)
            stored = _stored_tensors(directory)
            recommenders.append(Recommender(model))
            rows.append({
                "variant": name, "kind": kind, "rank": rank,
                "ndcg10": quality["full/NDCG@10"], "hr10": quality["full/HR@10"],
                "size_bytes": size_on_disk(directory),
                "stored_values": sum(t.numel() for t in stored.values()),
                "table_bytes_per_item": table_bytes_per_item(directory, teacher.cfg.n_items + 1),
            })
        # Timing in interleaved rounds, each round in a rotated order, so drift of the shared
        # machine (and warm-up order) falls on every variant alike; medians over rounds.
        costs: list[list] = [[] for _ in rows]
        for round_index in range(ROUNDS):
            for offset in range(len(rows)):
                i = (round_index + offset) % len(rows)
                costs[i].append(measure_serving(recommenders[i], histories, requests=requests // ROUNDS, threads=threads))
        for row, row_costs in zip(rows, costs):
            row.update(threads=row_costs[0].threads, device=row_costs[0].device, batch_size=row_costs[0].batch_size,
                       rounds=ROUNDS, requests_per_round=row_costs[0].requests,
                       **{key: statistics.median(getattr(c, key) for c in row_costs)
                          for key in ("latency_p50_ms", "latency_p95_ms", "throughput_users_per_s")})
        base = rows[0]
        for row in rows:
            row["ndcg10_change"] = row["ndcg10"] / base["ndcg10"] - 1
            row["size_ratio"] = base["size_bytes"] / row["size_bytes"]
            row["latency_speedup"] = base["latency_p50_ms"] / row["latency_p50_ms"]
        return {"n_items": teacher.cfg.n_items, "d_model": teacher.cfg.d_model, "users": len(histories), "variants": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["ml-100k"], choices=list(TRAIN_DATASETS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compression.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results = {dataset: run(dataset, args.threads, args.requests) for dataset in args.datasets}
    machine = {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")
    print(f"\nmachine: {machine}")
    for dataset, result in results.items():
        print(f"\n{dataset}: {result['n_items']} items, d_model {result['d_model']}, {result['users']} test users\n")
        print("| variant | NDCG@10 | change | HR@10 | size KiB | smaller | table bytes/item | p50 ms | p95 ms | speed-up | users/s @256 |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in result["variants"]:
            print(f"| {r['variant']} | {r['ndcg10']:.4f} | {r['ndcg10_change']:+.2%} | {r['hr10']:.4f} | "
                  f"{r['size_bytes'] / 1024:,.0f} | {r['size_ratio']:.2f}x | {r['table_bytes_per_item']:.0f} | "
                  f"{r['latency_p50_ms']:.2f} | {r['latency_p95_ms']:.2f} | {r['latency_speedup']:.2f}x | "
                  f"{r['throughput_users_per_s']:,.0f} |")


if __name__ == "__main__":
    main()
