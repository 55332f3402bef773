"""Are the fp16/bf16 variants slower than the fp32 teacher once loaded, and if so why?

They are stored at half precision and computed in fp32 after loading
(pipeline/models/variants.py), so the same ops run on the same shapes. This
checks what could still differ, on a trained teacher and its test histories:

- dtype, contiguity and strides of every parameter and buffer after loading;
- subnormal (denormal) floats in the weights and in every module's output on the
  test histories (subnormal arithmetic is slow on x86 unless flushed to zero);
- batch-1 latency through `Recommender.recommend` of fp32, fp16, bf16 and a second,
  independently loaded fp32 copy (the control: its difference from fp32 is the
  noise of this machine), interleaved in rounds, with `torch.set_flush_denormal`
  off and on.

    python benchmarks/half_precision.py --workdir /path/to/workdir   # a work dir with features and models/main

Prints a JSON report.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.core.io import Layout  # noqa: E402
from pipeline.data.sequences import evaluation_batches, load_sequences  # noqa: E402
from pipeline.models.recommender import Recommender  # noqa: E402
from pipeline.models.sasrec import SASRec, load_model  # noqa: E402
from pipeline.models.variants import load_variant, save_variant  # noqa: E402


def subnormal_count(tensor: torch.Tensor) -> int:
    if not tensor.is_floating_point():
        return 0
    tiny = torch.finfo(tensor.dtype).tiny
    return int(((tensor != 0) & (tensor.abs() < tiny)).sum())


def layout_of(model: SASRec) -> dict:
    tensors = dict(model.state_dict())
    return {
        "dtypes": sorted({str(t.dtype) for t in tensors.values()}),
        "non_contiguous": [k for k, t in tensors.items() if not t.is_contiguous()],
        "weight_subnormals": sum(subnormal_count(t) for t in tensors.values()),
    }


@torch.inference_mode()
def activation_subnormals(model: SASRec, inputs: torch.Tensor, lengths: torch.Tensor) -> dict:
    """Subnormal values in each module's output, summed over modules, on the given batch."""
    counts = {"values": 0, "subnormal": 0}

    def hook(_module, _args, output):
        if isinstance(output, torch.Tensor):
            counts["values"] += output.numel()
            counts["subnormal"] += subnormal_count(output)

    handles = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    try:
        model.score(inputs, lengths)
    finally:
        for handle in handles:
            handle.remove()
    return counts


def timed_rounds(recommenders: dict[str, Recommender], histories: list[list[int]], rounds: int, calls: int) -> dict:
    names = list(recommenders)
    per_round: dict[str, list[float]] = {name: [] for name in names}
    for rec in recommenders.values():
        for history in histories[:10]:
            rec.recommend([history])
    for round_index in range(rounds):
        for offset in range(len(names)):
            name = names[(round_index + offset) % len(names)]
            times = []
            for i in range(calls):
                history = histories[(round_index * calls + i) % len(histories)]
                started = time.perf_counter()
                recommenders[name].recommend([history])
                times.append((time.perf_counter() - started) * 1000)
            per_round[name].append(statistics.median(times))
    return {name: round(statistics.median(v), 4) for name, v in per_round.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--run", default="main")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    layout = Layout(Path(args.workdir))
    teacher = load_model(layout.model_dir(args.run))
    data = load_sequences(layout.features_dir)
    batch = next(evaluation_batches(data, "test", 1 << 30, teacher.cfg.max_len))
    histories = [row[: int(n)].tolist() for row, n in zip(batch.inputs, batch.lengths)]
    report: dict = {"threads": args.threads, "users": len(histories)}
    with tempfile.TemporaryDirectory() as tmp:
        models = {"fp32": teacher}
        for kind in ("fp16", "bf16", "fp32"):
            name = "fp32-copy" if kind == "fp32" else kind
            models[name] = load_variant(save_variant(teacher, Path(tmp) / name, kind))
        report["layout"] = {name: layout_of(model) for name, model in models.items()}
        report["activation_subnormals"] = {name: activation_subnormals(model, batch.inputs[:512], batch.lengths[:512])
                                           for name, model in models.items()}
        recommenders = {name: Recommender(model) for name, model in models.items()}
        for flush in (False, True):
            torch.set_flush_denormal(flush)
            report[f"batch1_ms_flush_denormal_{str(flush).lower()}"] = timed_rounds(recommenders, histories, args.rounds,
                                                                                  args.calls)
        torch.set_flush_denormal(False)
    sys.stdout.write(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
