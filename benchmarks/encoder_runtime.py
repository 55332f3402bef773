"""Cost of the user vector (`last_hidden`) on CPU in each runtime, side by side in one run.

SASRec presets with random-init weights (timing does not depend on training), histories of
length 50, a fixed thread count, batch 1 and batch 256. Every way of computing the user
vector is timed in the same process, in interleaved rounds (each round in a rotated order, so
drift of a shared machine falls on all alike); a figure is the median over rounds of each
round's median call. Ways:

    eager             today's path: all positions through every block, then the last one gathered
    eager-last        the final block computes query, output projection and FFN at the last position only
    ao-int8wo(-last)  torchao Int8WeightOnlyConfig Linear layers (today's int8 variant)
    ao-int8dyn(-last) torchao Int8DynamicActivationInt8WeightConfig (int8 activations and weights)
    ort(-last)        ONNX Runtime fp32 (torch.onnx.export, dynamic batch/length, all graph optimizations)
    ort-int8(-last)   the same graph through onnxruntime.quantization.quantize_dynamic

Each way's output is compared with eager fp32 (max abs difference on the timed batch).

    python benchmarks/encoder_runtime.py                     # small and medium, 2 threads
    python benchmarks/encoder_runtime.py --presets small --rounds 9

Writes benchmarks/results/encoder_runtime-t<threads>.json and prints a Markdown table.

`--workdir W` times the served path instead: the trained teacher and the variants that
`python -m pipeline compress --workdir W -S compress.runtime=onnx` built, each through
`Recommender.recommend` (top-10 of the full catalogue, seen items excluded) with its PyTorch encoder,
with its ONNX one (encoder.onnx, weights from model.safetensors) and `auto` (ONNX Runtime up to
`--encoder-max-batch` users a call, PyTorch above: `compress.runtime: auto`), on W's test histories:
batch 1 (one user per call, the users in turn) and batch 256. NDCG@10 (full ranking, test split)
of every model in both runtimes first; timed are the teacher and every variant within
`--within` of the teacher's NDCG@10 (`--all`: every variant). All thread counts of `--threads`
are timed in one process, rounds alternating between them and rotating the order of the models,
so the load of a shared machine falls on all alike; the load average is recorded per round.

    python benchmarks/encoder_runtime.py --workdir W --threads 1 2 --rounds 15

`--onnx-threads 1` adds rows `onnx-1t` and `auto-1t`: the same encoder with its ONNX Runtime session capped at
one intra-op thread, timed in the same rounds (does a small-batch session need the cores PyTorch uses above it?).

`--sweep 1 4 16 64 256` adds, in the same process after the served rounds, the user vector alone
(`last_hidden` on the same test histories) of every variant with an encoder in PyTorch and in ONNX
Runtime at each batch size: where the two cross is what `compress.encoder_max_batch` should be.
`--profile B` instead profiles one call of `recommend` at batch B of each `--profile-models` model
(torch path; torch.profiler's operator table, CPU time by operator) and prints the tables.

Writes benchmarks/results/encoder_runtime-served.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.core.config import CompressConfig  # noqa: E402
from pipeline.models.onnx_encoder import OnnxEncoder, export_encoder, export_graph  # noqa: E402
from pipeline.models.sasrec import SASRec, build_sasrec  # noqa: E402
from pipeline.models.variants import size_on_disk  # noqa: E402

logger = logging.getLogger("encoder_runtime")
N_ITEMS = 3000
HISTORY = 50


class FullSequenceGraph(nn.Module):
    """Today's computation as a graph: every position through every block, then the last gathered."""

    def __init__(self, model: SASRec):
        super().__init__()
        self.model = model

    def forward(self, embedded: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = embedded * math.sqrt(m.cfg.d_model) + m.position_embedding.weight[: embedded.shape[1]]
        for block in m.blocks:
            x = block(x)
        return m.final_norm(x)[torch.arange(x.shape[0]), (lengths - 1).clamp(min=0)]


def today(model: SASRec, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    hidden = model.hidden(items)
    return hidden[torch.arange(hidden.shape[0]), lengths - 1]


def torchao(model: SASRec, dynamic: bool) -> SASRec:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    quantized = copy.deepcopy(model)
    quantize_(quantized.blocks, Int8DynamicActivationInt8WeightConfig() if dynamic else Int8WeightOnlyConfig())
    return quantized.eval()


def ways(model: SASRec, tmp: Path) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    int8wo, int8dyn = torchao(model, dynamic=False), torchao(model, dynamic=True)
    tensors = model.state_dict()  # the graphs hold no weights: they are supplied from these at session start
    encoders = {
        "ort": export_graph(FullSequenceGraph(model).eval(), model.cfg.d_model, model.cfg.max_len, tmp / "full.onnx",
                            False, tensors),
        "ort-last": export_encoder(model, tmp / "last.onnx"),
        "ort-int8": export_graph(FullSequenceGraph(model).eval(), model.cfg.d_model, model.cfg.max_len,
                                 tmp / "full8.onnx", True, tensors),
        "ort-int8-last": export_encoder(model, tmp / "last8.onnx", int8=True),
    }
    found = {
        "eager": lambda i, n: today(model, i, n),
        "eager-last": model.last_hidden,
        "ao-int8wo": lambda i, n: today(int8wo, i, n),
        "ao-int8wo-last": int8wo.last_hidden,
        "ao-int8dyn": lambda i, n: today(int8dyn, i, n),
        "ao-int8dyn-last": int8dyn.last_hidden,
    }
    for name, path in encoders.items():
        encoder = OnnxEncoder(path, tensors)
        found[name] = lambda i, n, e=encoder: e(model.embed(i), n)
    sizes = {name: path.stat().st_size for name, path in encoders.items()}
    logger.info("ONNX file sizes: %s", sizes)
    return found


def interleaved(fns: dict[str, Callable], args: tuple, rounds: int, calls: int) -> dict[str, float]:
    """Median over rounds of each round's median call time (ms), the order rotated every round."""
    names = list(fns)
    per_round: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for fn in fns.values():  # warm-up: first calls allocate and (ORT) plan
            for _ in range(3):
                fn(*args)
        for round_index in range(rounds):
            for offset in range(len(names)):
                name = names[(round_index + offset) % len(names)]
                times = []
                for _ in range(calls):
                    started = time.perf_counter()
                    fns[name](*args)
                    times.append((time.perf_counter() - started) * 1000)
                per_round[name].append(statistics.median(times))
    return {name: statistics.median(values) for name, values in per_round.items()}


def inputs(batch: int, varying: bool, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded histories: length 50 everywhere (timing) or 1..50 (to check the gather)."""
    lengths = (torch.randint(1, HISTORY + 1, (batch,), generator=generator) if varying
               else torch.full((batch,), HISTORY))
    lengths[0] = HISTORY
    items = torch.randint(1, N_ITEMS + 1, (batch, HISTORY), generator=generator)
    items[torch.arange(HISTORY) >= lengths.view(-1, 1)] = 0
    return items, lengths


def run_preset(preset: str, schedule: dict[int, tuple[int, int]]) -> dict:
    """`schedule`: batch size -> (rounds, calls per round)."""
    torch.manual_seed(0)
    model = build_sasrec(N_ITEMS, preset).eval()
    generator = torch.Generator().manual_seed(0)
    result: dict = {"preset": preset, **{k: getattr(model.cfg, k) for k in ("d_model", "n_layers", "n_heads", "max_len")}}
    with tempfile.TemporaryDirectory() as tmp:
        fns = ways(model, Path(tmp))
        check_items, check_lengths = inputs(64, varying=True, generator=generator)
        with torch.inference_mode():
            reference = today(model, check_items, check_lengths)
            result["max_abs_diff"] = {name: float((fn(check_items, check_lengths) - reference).abs().max())
                                      for name, fn in fns.items()}
        for batch, (rounds, calls) in schedule.items():
            items, lengths = inputs(batch, varying=False, generator=generator)
            result[f"batch{batch}_ms"] = interleaved(fns, (items, lengths), rounds, calls)
            logger.info("%s batch %d: %s", preset, batch, {k: round(v, 3) for k, v in result[f"batch{batch}_ms"].items()})
    return result


def markdown(results: list[dict], threads: int) -> str:
    lines = [f"Median ms per call ({threads} threads), speed-up vs eager fp32 in brackets; max |diff| vs eager fp32.", "",
             "| preset | way | batch 1 ms | batch 256 ms | users/s at 256 | max abs diff |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in results:
        b1, b256 = r["batch1_ms"], r["batch256_ms"]
        for name in b1:
            lines.append(f"| {r['preset']} | {name} | {b1[name]:.3f} ({b1['eager'] / b1[name]:.2f}x) | "
                         f"{b256[name]:.2f} ({b256['eager'] / b256[name]:.2f}x) | {256_000 / b256[name]:,.0f} | "
                         f"{r['max_abs_diff'][name]:.1e} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the served path (--workdir)


def served_models(workdir: Path, run: str) -> dict[str, Path]:
    """teacher (models/<run>) and every built variant (models/<run>/variants/<name>)."""
    teacher = workdir / "models" / run
    variants = sorted(p for p in (teacher / "variants").iterdir() if p.is_dir() and not p.name.startswith("."))
    return {"teacher": teacher, **{p.name: p for p in variants}}


def runtime_copies(model: SASRec, encoder_max_batch: int, onnx_threads: int | None = None) -> dict[str, SASRec]:
    """The model with its user vectors in PyTorch, in ONNX Runtime with torch's thread count, and by batch size
    (copies share the encoder); with `onnx_threads`, also ONNX Runtime and auto with that cap on the session's threads."""
    uncapped = model.encoder.capped(None)  # whatever load_variant chose: a session with torch's thread count
    ways = [("torch", None, None), ("onnx", uncapped, None), ("auto", uncapped, encoder_max_batch)]
    if onnx_threads is not None:
        capped = model.encoder.capped(onnx_threads)
        ways += [(f"onnx-{onnx_threads}t", capped, None), (f"auto-{onnx_threads}t", capped, encoder_max_batch)]
    copies = {}
    for runtime, encoder, max_batch in ways:
        copies[runtime] = copy.deepcopy(model)
        copies[runtime].encoder, copies[runtime].encoder_max_batch = encoder, max_batch
    return copies


def padded(histories: list[list[int]], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs of the histories' last max_len items (as Recommender builds them) and their lengths."""
    recent = [h[-max_len:] for h in histories]
    width = max(len(h) for h in recent)
    return (torch.tensor([h + [0] * (width - len(h)) for h in recent], dtype=torch.long),
            torch.tensor([len(h) for h in recent], dtype=torch.long))


def sweep(models: dict[str, dict[str, SASRec]], histories: list[list[int]], sizes: list[int], threads: list[int],
          rounds: int) -> dict:
    """ms of the user vector alone per (threads, batch, model/runtime): PyTorch against ONNX Runtime."""
    result: dict[str, dict[str, float]] = {}
    for t in threads:
        torch.set_num_threads(t)
        for size in sizes:
            items, lengths = padded(histories[:size], next(iter(next(iter(models.values())).values())).cfg.max_len)
            fns = {f"{name}/{runtime}": (lambda i, n, m=m: m.last_hidden(i, n))
                   for name, copies in models.items() for runtime, m in copies.items() if runtime != "auto"}
            calls = max(1, 64 // size)
            result[f"t{t}_b{size}"] = interleaved(fns, (items, lengths), rounds, calls)
            logger.info("sweep %d threads batch %d: %s", t, size, {k: round(v, 3) for k, v in result[f"t{t}_b{size}"].items()})
    return result


def profile(workdir: Path, run: str, names: list[str], batch: int, threads: int) -> str:
    """torch.profiler's operator table of one `recommend` call at `batch` users per model (torch path)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from pipeline.data.sequences import evaluation_batches, load_sequences
    from pipeline.models.recommender import Recommender
    from pipeline.models.variants import load_variant

    torch.set_num_threads(threads)
    data = load_sequences(workdir / "data" / "features")
    models = served_models(workdir, run)
    out = []
    for name in names:
        model = load_variant(models[name])
        model.encoder = None
        recommender = Recommender(model)
        test = next(evaluation_batches(data, "test", 1 << 30, model.cfg.max_len))
        histories = [row[: int(n)].tolist() for row, n in zip(test.inputs, test.lengths)][:batch]
        with torch.inference_mode():
            for _ in range(5):
                recommender.recommend(histories, 10)
            times = []
            for _ in range(9):
                started = time.perf_counter()
                recommender.recommend(histories, 10)
                times.append((time.perf_counter() - started) * 1000)
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(5):
                    recommender.recommend(histories, 10)
        out.append(f"## {name}: batch {batch}, {threads} threads, median {statistics.median(times):.2f} ms a call "
                   f"(9 calls); profile of 5 calls\n\n```\n"
                   f"{prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=18)}\n```\n")
    return "\n".join(out)


def served(workdir: Path, run: str, threads: list[int], rounds: int, within: float, every: bool,
           encoder_max_batch: int, sizes: list[int] | None = None, onnx_threads: int | None = None) -> dict:
    from pipeline.data.sequences import evaluation_batches, load_sequences
    from pipeline.evaluation.metrics import evaluate
    from pipeline.models.recommender import Recommender
    from pipeline.models.variants import load_variant

    data = load_sequences(workdir / "data" / "features")
    recommenders: dict[str, Recommender] = {}
    rows: dict[str, dict] = {}
    torch.set_num_threads(threads[0])
    for name, directory in served_models(workdir, run).items():
        model = load_variant(directory)
        runtimes = {"torch": model}
        if model.encoder is not None:
            runtimes = runtime_copies(model, encoder_max_batch, onnx_threads)
        for runtime, m in runtimes.items():
            key = f"{name}/{runtime}"
            quality = evaluate(lambda b, m=m: m.score(b.inputs, b.lengths), data, "test", ks=(10,), batch_size=512,
                               max_len=m.cfg.max_len, sampled_strategies=(), seed=0, progress=False)
            rows[key] = {"model": name, "runtime": runtime, "ndcg@10": quality["full/NDCG@10"],
                         "size_bytes": size_on_disk(directory),
                         "encoder_bytes": (directory / "encoder.onnx").stat().st_size if runtime == "onnx" else 0}
            recommenders[key] = Recommender(m)
            logger.info("%s: NDCG@10 %.4f, %s bytes", key, rows[key]["ndcg@10"], f"{rows[key]['size_bytes']:,}")
    teacher = rows["teacher/torch"]["ndcg@10"]
    for row in rows.values():
        row["ndcg@10_change"] = row["ndcg@10"] / teacher - 1
    timed = [k for k, r in rows.items() if every or r["model"] in ("teacher", "fp32") or r["ndcg@10_change"] >= -within]
    batch = next(evaluation_batches(data, "test", 1 << 30, recommenders["teacher/torch"].max_len))
    histories = [row[: int(n)].tolist() for row, n in zip(batch.inputs, batch.lengths)]
    big = histories[:256]
    users = iter(range(1 << 62))
    calls = {1: 20, 256: 1}
    per_round: dict[tuple[int, int, str], list[float]] = {(t, b, k): [] for t in threads for b in calls for k in timed}
    loads = []
    with torch.inference_mode():
        for round_index in range(rounds):
            for t in threads:
                torch.set_num_threads(t)
                for key in timed:  # warm-up after the thread change (an ONNX session is rebuilt once)
                    for _ in range(2):
                        recommenders[key].recommend([histories[next(users) % len(histories)]], 10)
                    recommenders[key].recommend(big, 10)
                loads.append(os.getloadavg()[0])
                for offset in range(len(timed)):
                    key = timed[(round_index + offset) % len(timed)]
                    for size, n in calls.items():
                        times = []
                        for _ in range(n):
                            request = big if size == 256 else [histories[next(users) % len(histories)]]
                            started = time.perf_counter()
                            recommenders[key].recommend(request, 10)
                            times.append((time.perf_counter() - started) * 1000)
                        per_round[(t, size, key)].append(statistics.median(times))
            logger.info("round %d/%d, load %.2f", round_index + 1, rounds, loads[-1])
    for key in timed:
        for t in threads:
            for size in calls:
                rows[key][f"t{t}_b{size}_ms"] = statistics.median(per_round[(t, size, key)])
    for key in timed:
        for t in threads:
            for size in calls:
                rows[key][f"t{t}_b{size}_speedup"] = rows["teacher/torch"][f"t{t}_b{size}_ms"] / rows[key][f"t{t}_b{size}_ms"]
    report = {"threads": threads, "rounds": rounds, "users": len(histories), "timed": timed, "load_per_round": loads,
              "load_median": statistics.median(loads), "load_min": min(loads), "load_max": max(loads),
              "encoder_max_batch": encoder_max_batch, "models": rows}
    if sizes:
        with_encoder = {name: {r: recommenders[f"{name}/{r}"].model for r in ("torch", "onnx")}
                        for name in {rows[k]["model"] for k in timed if rows[k]["runtime"] == "onnx"}}
        started_load = os.getloadavg()[0]
        report["sweep"] = sweep(dict(sorted(with_encoder.items())), histories, sizes, threads, max(3, rounds // 2))
        report["sweep_load"] = [started_load, os.getloadavg()[0]]
    return report


def served_markdown(report: dict) -> str:
    threads = report["threads"]
    head = "| model | runtime | NDCG@10 | change | size KiB | " + " | ".join(
        f"{t}t b1 ms | {t}t b1 x | {t}t b256 ms | {t}t b256 x" for t in threads) + " |"
    lines = [f"{report['users']} test users; medians of {report['rounds']} rounds; speed-up (x) against teacher/torch at "
             f"the same threads; load average per round median {report['load_median']:.2f} "
             f"(min {report['load_min']:.2f}, max {report['load_max']:.2f}).", "", head,
             "| --- | --- | ---: | ---: | ---: | " + " | ".join("---: | ---: | ---: | ---:" for _ in threads) + " |"]
    for key, r in report["models"].items():
        cells = [r["model"], r["runtime"], f"{r['ndcg@10']:.4f}", f"{100 * r['ndcg@10_change']:+.2f}%",
                 f"{r['size_bytes'] / 1024:,.1f}"]
        for t in threads:
            if key in report["timed"]:
                cells += [f"{r[f't{t}_b1_ms']:.3f}", f"{r[f't{t}_b1_speedup']:.2f}x",
                          f"{r[f't{t}_b256_ms']:.1f}", f"{r[f't{t}_b256_speedup']:.2f}x"]
            else:
                cells += ["", "", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sweep_markdown(result: dict) -> str:
    keys = sorted({k.rsplit("/", 1)[0] for row in result.values() for k in row})
    lines = ["", "User vector alone, ms (onnx/torch speed-up):", "",
             "| threads | batch | " + " | ".join(f"{k} torch | {k} onnx" for k in keys) + " |",
             "| ---: | ---: | " + " | ".join("---: | ---:" for _ in keys) + " |"]
    for where, row in result.items():
        t, b = where[1:].split("_b")
        cells = []
        for k in keys:
            eager, ort = row[f"{k}/torch"], row[f"{k}/onnx"]
            cells += [f"{eager:.3f}", f"{ort:.3f} ({eager / ort:.2f}x)"]
        lines.append(f"| {t} | {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["small", "medium"])
    parser.add_argument("--threads", type=int, nargs="+", default=[2], help="one count; with --workdir, several")
    parser.add_argument("--rounds", type=int, default=30, help="batch-1 rounds; batch 256 runs half as many")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--workdir", help="time the served teacher and variants of this pipeline root instead")
    parser.add_argument("--run", default="main", help="with --workdir: models/<run>")
    parser.add_argument("--within", type=float, default=0.01, help="with --workdir: time variants within this NDCG@10 loss")
    parser.add_argument("--all", action="store_true", help="with --workdir: time every variant")
    parser.add_argument("--encoder-max-batch", type=int, default=CompressConfig().encoder_max_batch,
                        help="with --workdir: the runtime auto rows' largest ONNX Runtime batch")
    parser.add_argument("--sweep", type=int, nargs="*", help="with --workdir: also the user vector alone at these batch sizes")
    parser.add_argument("--onnx-threads", type=int, help="with --workdir: also onnx and auto with ONNX Runtime capped at "
                                                         "this many intra-op threads (rows onnx-Nt, auto-Nt)")
    parser.add_argument("--profile", type=int, help="with --workdir: profile recommend at this batch size instead")
    parser.add_argument("--profile-models", nargs="+", default=["teacher", "distilled"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine()}
    if args.workdir and args.profile:
        sys.stdout.write(profile(Path(args.workdir), args.run, args.profile_models, args.profile, args.threads[0]))
        return
    if args.workdir:
        report = served(Path(args.workdir), args.run, args.threads, args.rounds, args.within, args.all,
                        args.encoder_max_batch, args.sweep, args.onnx_threads)
        (out / "encoder_runtime-served.json").write_text(json.dumps({"machine": machine, **report}, indent=2) + "\n")
        sys.stdout.write(served_markdown(report))
        if report.get("sweep"):
            sys.stdout.write(sweep_markdown(report["sweep"]))
        return
    if len(args.threads) != 1:
        parser.error("--threads takes one count without --workdir")
    args.threads = args.threads[0]
    torch.set_num_threads(args.threads)
    results = []
    for preset in args.presets:
        # Many short rounds, not a few long ones: a burst of load from a neighbour then falls on one round
        # of one way and the median drops it. Batch 256 of medium costs ~100x a batch-1 call: one call a round.
        results.append(run_preset(preset, {1: (args.rounds, 10), 256: (max(5, args.rounds // 2), 1)}))
    machine["threads"] = args.threads
    (out / f"encoder_runtime-t{args.threads}.json").write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")
    sys.stdout.write(markdown(results, args.threads))


if __name__ == "__main__":
    main()
