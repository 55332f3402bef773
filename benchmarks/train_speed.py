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

Other modes time single optimizer steps of the training engine (`Engine.train_step`, the
teacher's settings from params.yaml) on synthetic batches, no ingest:
  --mode loss-scaling  full vs chunked softmax at several catalogue sizes (step time and
                       peak RSS, each configuration in its own child process), the machine's
                       fp32 GEMM rate at the output layer's shape, and the chunked loss's
                       time against its matmul FLOPs at that rate: the `train.loss: auto` threshold;
  --mode sparse        sampled softmax on a large catalogue, dense AdamW vs sparse item-table
                       updates (train.sparse_item_updates), steps interleaved in one process;
  --mode large         the `large` preset for a fixed number of steps: step time, tokens/s,
                       peak RSS (CPU) or peak allocated memory and TFLOP/s (CUDA, fp32 and bf16),
                       parameter count;
  --mode loss-quality  the same data trained with the dense and the blocked exact loss in one run (same
                       seed and settings): test NDCG@10, epochs, seconds per epoch (--leanrec-override
                       style `-S key=value` settings apply to both, e.g. a fixed epoch count);
  --mode time-to-quality  seconds until validation NDCG@10 reaches RecBole 1.2.1's SASRec's best on the
                       same split, the peer in its own venv (benchmarks/time_to_quality.py, which
                       takes the remaining arguments: `--mode time-to-quality --help`);
  --mode catalogue     sampled softmax with sparse updates on a 1M-item synthetic catalogue, trained by the
                       train stage to a plateau, tested against popularity (benchmarks/catalogue_training.py).

    python benchmarks/train_speed.py                          # ML-100K and 1M synthetic, CPU
    python benchmarks/train_speed.py --datasets ml-100k
    python benchmarks/train_speed.py --gpu --datasets synthetic-1m
    python benchmarks/train_speed.py --mode loss-scaling --items 5000 20000 50000 100000 200000
    python benchmarks/train_speed.py --mode sparse --items 200000
    python benchmarks/train_speed.py --mode large --batch-size 8 --seq-len 50 --steps 3
    python benchmarks/train_speed.py --mode loss-quality --datasets ml-100k synthetic-1m -S train.epochs=5
    python benchmarks/train_speed.py --mode time-to-quality --datasets ml-100k synthetic-short
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
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.data_pipeline import DATASETS  # noqa: E402
from pipeline.core.config import load_params  # noqa: E402
from pipeline.core.io import Layout  # noqa: E402
from pipeline.data.features_outofcore import run_features_on  # noqa: E402
from pipeline.data.ingest import run_ingest  # noqa: E402
from pipeline.data.sequences import SequenceData, training_batches  # noqa: E402
from pipeline.data.validation import run_validate  # noqa: E402
from pipeline.evaluation.evaluate import run_evaluate  # noqa: E402
from pipeline.models.sasrec import SASRec, count_parameters  # noqa: E402
from pipeline.training.engine import Engine  # noqa: E402
from pipeline.training.losses import module_loss  # noqa: E402
from pipeline.training.train import build_model_config, engine_settings, flops_per_token, run_train, teacher_loss  # noqa: E402

logger = logging.getLogger("train_speed")

TRAIN_DATASETS = {
    "ml-100k": DATASETS["ml-100k"],
    # Patience 3 (the params.yaml default) keeps this run inside ~45 minutes on 2 cores.
    "synthetic-1m": ["ingest.synthetic.n_interactions=1000000", "ingest.synthetic.n_items=5000", "train.early_stopping_patience=3"],
}
COMMON = ["tracking.enabled=false", "train.epochs=200", "train.early_stopping_patience=5"]


def time_to_target(history: list[dict], target: float) -> float | None:
    """elapsed_seconds of the first epoch whose valid_ndcg10 >= target (None: never reached)."""
    for record in history:
        if record["valid_ndcg10"] >= target:
            return record["elapsed_seconds"]
    return None


def prepare(dataset: str, workdir: Path) -> Layout:
    """Ingest, validate and features of a named dataset of TRAIN_DATASETS."""
    return prepare_overrides(TRAIN_DATASETS[dataset], workdir)[0]


def prepare_overrides(overrides: list[str], workdir: Path) -> tuple[Layout, int]:
    """Ingest, validate and features of params.yaml with `overrides` (on its `data_engine`): the layout and the run's seed."""
    params = load_params(ROOT / "params.yaml", overrides)
    layout = Layout(workdir)
    run_ingest(params.ingest, layout, seed=params.seed)
    run_validate(params.validate_, layout, engine=params.data_engine, spark=params.spark)
    run_features_on(params.data_engine, params.features, layout, params.spark)
    return layout, params.seed


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


def loss_quality(args) -> dict:
    """Each dataset prepared once, then trained with each exact loss (nothing else differs) and tested."""
    results = {}
    for dataset in args.datasets:
        with tempfile.TemporaryDirectory(prefix=f"leanrec-loss-{dataset}-") as tmp:
            layout = prepare(dataset, Path(tmp))
            for loss in ("full_softmax", "chunked_softmax"):
                run = train_and_test(layout, dataset, loss, [f"train.loss={loss}", "train.baselines=[]", *args.set])
                epoch_s = [r["train_seconds"] for r in run["history"]]
                results[f"{dataset}/{loss}"] = {**run, "median_epoch_train_s": statistics.median(epoch_s)}
                logger.info("%s %s: %d epochs, median %.1f s/epoch, test NDCG@10 %.4f", dataset, loss, run["epochs"],
                            statistics.median(epoch_s), run["test"]["sasrec"]["full/NDCG@10"])
    return {"results": results, "settings": args.set}


def print_loss_quality(result: dict) -> None:
    print("| dataset | loss | epochs | best epoch | median epoch train s | best valid NDCG@10 | test NDCG@10 | test HR@10 |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in result["results"].items():
        dataset, loss = name.split("/")
        test = r["test"]["sasrec"]
        print(f"| {dataset} | {loss} | {r['epochs']} | {r['best_epoch']} | {r['median_epoch_train_s']:.1f} | "
              f"{r['best_valid_ndcg10']:.4f} | {test['full/NDCG@10']:.4f} | {test['full/HR@10']:.4f} |")


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


# ----------------------------------------------------------------------------- engine steps on synthetic batches


def synthetic_data(n_items: int, n_users: int, seq_len: int, seed: int, exponent: float = 1.0) -> SequenceData:
    """Users with seq_len + 1 training items each (one full batch window), items drawn Zipf(exponent)."""
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, n_items + 1) ** exponent
    per_user = seq_len + 3  # train (seq_len + 1), valid, test
    items = rng.choice(np.arange(1, n_items + 1), size=n_users * per_user, p=popularity / popularity.sum()).astype(np.int64)
    ones = np.ones(n_users, dtype=np.int64)
    return SequenceData(users=np.arange(1, n_users + 1), offsets=np.arange(n_users + 1, dtype=np.int64) * per_user,
                        items=items, n_train=ones * (seq_len + 1), n_valid=ones, n_test=ones, n_items=n_items,
                        n_user_index=n_users)


def step_engine(data: SequenceData, overrides: list[str], device: torch.device, workdir: Path) -> tuple[Engine, dict]:
    """The teacher's model, loss and engine settings (params.yaml + overrides), as pipeline/training/train.py builds them."""
    cfg = load_params(ROOT / "params.yaml", ["tracking.enabled=false", *overrides]).train
    torch.manual_seed(0)
    model_cfg = build_model_config(cfg, data.n_items)
    model = SASRec(model_cfg).to(device)
    loss_module = teacher_loss(cfg, model, data, device)
    loss = loss_module.loss
    settings = engine_settings(cfg, 0, device, workdir / "unused.pt", False, 512)
    engine = Engine(model, data, module_loss, settings, device, loss_module=loss_module)
    info = {"loss": loss, "parameters": count_parameters(model), "model": model_cfg.to_dict(),
            "flops_per_token": flops_per_token(model_cfg, data.n_train.max() - 1, loss, cfg.n_negatives)}
    return engine, info


def one_batch(data: SequenceData, batch_size: int, seq_len: int, device: torch.device):
    return next(training_batches(data, batch_size, seq_len, seed=0, epoch=0)).to(device)


def timed_step(engine: Engine, batch) -> float:
    started = time.perf_counter()
    engine.train_step(batch)
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    return time.perf_counter() - started


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gemm_gflops(tokens: int, d: int, n: int, repeats: int = 10) -> float:
    """fp32 rate of hidden (tokens, d) @ weights.T (d, n), the output layer's matmul, median of `repeats`."""
    hidden, weights = torch.randn(tokens, d), torch.randn(n, d)
    for _ in range(2):
        hidden @ weights.T
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        hidden @ weights.T
        times.append(time.perf_counter() - started)
    return 2 * tokens * d * n / statistics.median(times) / 1e9


def loss_step_worker(args) -> dict:
    """Child process of --mode loss-scaling: one (loss, catalogue size); peak RSS is this process's."""
    data = synthetic_data(args.items[0], args.batch_size, args.seq_len, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        engine, info = step_engine(data, [f"train.loss={args.loss}", f"train.batch_size={args.batch_size}"],
                                   torch.device("cpu"), Path(tmp))
        batch = one_batch(data, args.batch_size, args.seq_len, engine.device)
        rss_before = current_rss_mib()
        times = [timed_step(engine, batch) for _ in range(args.steps + 1)][1:]  # the first step warms up
        # The loss alone, forward + backward, on the model's hidden states: what the output layer costs.
        module = engine.step_module
        with torch.no_grad():
            hidden = module.model(batch.inputs)[batch.targets != 0]
        hidden.requires_grad_(True)
        weights = module.model.item_weights()
        positives = batch.targets[batch.targets != 0]
        loss_times = []
        for _ in range(1):  # once: at 200k items one chunked pass is about a minute on 2 cores
            started = time.perf_counter()
            if args.loss == "full_softmax":
                logits = hidden @ weights.T
                logits[:, 0] = float("-inf")
                value = torch.nn.functional.cross_entropy(logits, positives, reduction="sum")
            else:
                from pipeline.training.chunked_ce import chunked_cross_entropy

                value = chunked_cross_entropy(hidden, weights, positives, module.block_logits)
            value.backward()
            loss_times.append(time.perf_counter() - started)
            del value
            hidden.grad = weights.grad = None
    return {"loss": args.loss, "items": args.items[0], "tokens": int(batch.lengths.sum()), "step_s": statistics.median(times),
            "step_times_s": times, "loss_fwd_bwd_s": statistics.median(loss_times), "rss_before_mib": rss_before,
            "peak_rss_mib": peak_rss_mib(), "parameters": info["parameters"]}


def loss_scaling(args) -> dict:
    tokens, d = args.batch_size * args.seq_len, 64
    rate = {"tokens": tokens, "d": d, "n": args.gemm_items, "gflops": gemm_gflops(tokens, d, args.gemm_items)}
    logger.info("fp32 GEMM (%d x %d) @ (%d x %d): %.1f GFLOP/s", tokens, d, d, args.gemm_items, rate["gflops"])
    rows = []
    for items in args.items:
        for loss in ("full_softmax", "chunked_softmax"):
            # The dense loss holds about 4 tokens x catalogue fp32 buffers at its peak (logits, log-softmax, their grads).
            estimate_gib = 4 * tokens * (items + 1) * 4 / 2**30
            if loss == "full_softmax" and estimate_gib > args.memory_budget_gib:
                rows.append({"loss": loss, "items": items, "skipped": f"estimated {estimate_gib:.1f} GiB > --memory-budget-gib"})
                logger.info("%s at %d items: skipped (estimated %.1f GiB)", loss, items, estimate_gib)
                continue
            command = [sys.executable, __file__, "--worker", "loss-step", "--loss", loss, "--items", str(items),
                       "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps)]
            proc = subprocess.run(command, capture_output=True, text=True, timeout=1200)
            if proc.returncode != 0:
                rows.append({"loss": loss, "items": items, "failed": proc.stderr[-2000:]})
                logger.warning("%s at %d items failed: %s", loss, items, proc.stderr[-500:])
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["extra_rss_mib"] = row["peak_rss_mib"] - row["rss_before_mib"]
            # Both losses: the logits, their gradient to the hidden states and to the table (3 matmuls of 2 T d N FLOPs);
            # the chunked loss forms each block's gradient in the forward pass and computes no logits twice.
            row["loss_matmul_gflop"] = 6 * row["tokens"] * d * items / 1e9
            row["loss_matmul_s_at_gemm_rate"] = row["loss_matmul_gflop"] / rate["gflops"]
            rows.append(row)
            logger.info("%s at %d items: step %.3f s, loss fwd+bwd %.3f s, extra RSS %.0f MiB", loss, items, row["step_s"],
                        row["loss_fwd_bwd_s"], row["extra_rss_mib"])
    return {"gemm": rate, "rows": rows, "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps}


def print_loss_scaling(result: dict) -> None:
    print(f"\nfp32 GEMM ({result['gemm']['tokens']} x {result['gemm']['d']}) @ ({result['gemm']['d']} x {result['gemm']['n']}): "
          f"{result['gemm']['gflops']:.1f} GFLOP/s\n")
    print("| items | loss | step s | loss fwd+bwd s | loss matmul GFLOP | at GEMM rate s | extra peak RSS MiB |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in result["rows"]:
        if "step_s" not in r:
            print(f"| {r['items']:,} | {r['loss']} | {r.get('skipped') or 'failed'} | | | | |")
            continue
        print(f"| {r['items']:,} | {r['loss']} | {r['step_s']:.3f} | {r['loss_fwd_bwd_s']:.3f} | {r['loss_matmul_gflop']:.1f} | "
              f"{r['loss_matmul_s_at_gemm_rate']:.3f} | {r['extra_rss_mib']:,.0f} |")


def sparse_updates(args) -> dict:
    """Dense AdamW vs sparse item-table updates under sampled softmax, steps alternating in one process."""
    items = args.items[0]
    data = synthetic_data(items, args.batch_size, args.seq_len, seed=0)
    common = ["train.loss=sampled_softmax", f"train.batch_size={args.batch_size}", f"train.n_negatives={args.negatives}"]
    with tempfile.TemporaryDirectory() as tmp:
        engines = {name: step_engine(data, [*common, f"train.sparse_item_updates={flag}"], torch.device("cpu"), Path(tmp))[0]
                   for name, flag in (("dense AdamW", "false"), ("sparse (SparseAdam table)", "true"))}
        batch = one_batch(data, args.batch_size, args.seq_len, torch.device("cpu"))
        times: dict[str, list[float]] = {name: [] for name in engines}
        cpu_times: dict[str, list[float]] = {name: [] for name in engines}
        for step in range(args.steps + 1):
            for name, engine in engines.items():
                cpu_started = time.process_time()  # CPU seconds of all this process's threads: less load-dependent
                seconds = timed_step(engine, batch)
                if step:  # the first round warms up
                    times[name].append(seconds)
                    cpu_times[name].append(time.process_time() - cpu_started)
    touched = int(torch.unique(torch.cat([batch.inputs.flatten(), batch.targets.flatten()])).numel())
    dense, sparse = times.values()
    # Each round runs both steps back to back, so the per-round ratio is less exposed to the load of a shared machine.
    ratios = [d / s for d, s in zip(dense, sparse, strict=True)]
    return {"items": items, "tokens": int(batch.lengths.sum()), "negatives": args.negatives, "steps": args.steps,
            "rows_in_batch": touched, "step_s": {name: statistics.median(t) for name, t in times.items()},
            "min_step_s": {name: min(t) for name, t in times.items()}, "median_round_speedup": statistics.median(ratios),
            "rounds_sparse_faster": sum(r > 1 for r in ratios), "step_times_s": times,
            "cpu_s": {name: statistics.median(t) for name, t in cpu_times.items()}, "cpu_times_s": cpu_times}


def large_preset(args) -> dict:
    """The large preset for a fixed number of steps; on CUDA fp32 and bf16 autocast, with TFLOP/s."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n_items = args.items[0]
    data = synthetic_data(n_items, args.batch_size, args.seq_len, seed=0)
    precisions = ("fp32", "bf16") if device.type == "cuda" else ("fp32",)
    out = {}
    for precision in precisions:
        overrides = ["train.preset=large", f"train.batch_size={args.batch_size}", f"train.precision={precision}",
                     f"train.device={device.type}"]
        with tempfile.TemporaryDirectory() as tmp:
            engine, info = step_engine(data, overrides, device, Path(tmp))
            batch = one_batch(data, args.batch_size, args.seq_len, device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = [timed_step(engine, batch) for _ in range(args.steps + 1)][1:]
            tokens = int(batch.lengths.sum())
            step = statistics.median(times)
            row = {"parameters": info["parameters"], "items": n_items, "batch_size": args.batch_size, "seq_len": args.seq_len,
                   "tokens_per_step": tokens, "step_s": step, "step_times_s": times, "tokens_per_s": tokens / step,
                   "loss": info["loss"]}
            if device.type == "cuda":
                row["peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
                row["tflops"] = info["flops_per_token"] * tokens / step / 1e12
            else:
                row["peak_rss_mib"] = peak_rss_mib()
            out[precision] = row
            del engine
    return {"device": str(device), "results": out}


def main() -> None:
    mode = argparse.ArgumentParser(add_help=False)
    mode.add_argument("--mode", default="quality")
    known, rest = mode.parse_known_args()
    if known.mode == "time-to-quality":  # its own module and arguments
        from benchmarks.time_to_quality import main as time_to_quality

        time_to_quality(rest)
        return
    if known.mode == "catalogue":
        from benchmarks.catalogue_training import main as catalogue_training

        catalogue_training(rest)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="quality", choices=["quality", "loss-scaling", "loss-quality", "sparse", "large",
                                                                                 "time-to-quality", "catalogue"],
                        help="quality (default): the training runs against the baselines; the others time engine steps")
    parser.add_argument("--datasets", nargs="+", default=list(TRAIN_DATASETS), choices=list(TRAIN_DATASETS))
    parser.add_argument("--target-fraction", type=float, default=0.95)
    parser.add_argument("--gpu", action="store_true", help="also the large preset on CUDA (bf16 vs fp32)")
    parser.add_argument("--items", type=int, nargs="+", default=None,
                        help="catalogue sizes (loss-scaling; default 5000 20000 50000 100000 200000), or the one size "
                             "(sparse: default 200000; large: default 3000)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 128 (large: 8)")
    parser.add_argument("--seq-len", type=int, default=50)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--negatives", type=int, default=256, help="sparse: sampled negatives")
    parser.add_argument("--gemm-items", type=int, default=8192, help="loss-scaling: columns of the timed GEMM (a chunk)")
    parser.add_argument("--memory-budget-gib", type=float, default=12.0,
                        help="loss-scaling: skip a full softmax whose estimated peak exceeds this")
    parser.add_argument("--loss", default="full_softmax", help=argparse.SUPPRESS)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                        help="loss-quality: a params override for both runs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING if args.mode == "quality" and not args.worker else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    defaults = {"loss-scaling": [5000, 20000, 50000, 100000, 200000], "sparse": [200000], "large": [3000]}
    args.items = args.items or defaults.get(args.mode, [3000])
    args.batch_size = args.batch_size or (8 if args.mode == "large" else 128)
    if args.worker == "loss-step":
        print(json.dumps(loss_step_worker(args)))
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    machine = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
               "threads": torch.get_num_threads(), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    if args.mode != "quality":
        run = {"loss-scaling": loss_scaling, "loss-quality": loss_quality, "sparse": sparse_updates, "large": large_preset}[args.mode]
        result = {"machine": machine, "mode": args.mode, **run(args)}
        out = Path(args.out or ROOT / "benchmarks" / "results" / f"train_speed_{args.mode}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"\nmachine: {machine}")
        if args.mode == "loss-scaling":
            print_loss_scaling(result)
        elif args.mode == "loss-quality":
            print_loss_quality(result)
        elif args.mode == "sparse":
            print(f"\n{result['items']:,} items, {result['tokens']} tokens, {result['negatives']} negatives, "
                  f"{result['rows_in_batch']:,} distinct items in the batch")
            for name, seconds in result["step_s"].items():
                print(f"| {name} | median {seconds:.3f} s/step | fastest {result['min_step_s'][name]:.3f} s | "
                      f"median CPU {result['cpu_s'][name]:.3f} s/step |")
            print(f"dense / sparse step time, median over rounds: {result['median_round_speedup']:.2f}x; sparse faster in "
                  f"{result['rounds_sparse_faster']} of {result['steps']} rounds")
        else:
            for precision, r in result["results"].items():
                print(f"large {precision} on {result['device']}: {json.dumps(r)}")
        return
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
    args.out = args.out or str(ROOT / "benchmarks" / "results" / "train_speed.json")
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
