"""Full-ranking evaluation: the ranking work per batch, numba kernels against the torch path.

`pipeline.evaluation.metrics.evaluate` ranks each user's held-out item among every catalogue item
(seen items excluded) and takes everybody's top-K for coverage. On CPU that is one pass of
`target_rank_counts` and `chunked_top_k` (pipeline/models/scoring.py) over the scores; the torch
path (CUDA tensors, no numba; what every CPU evaluation did before) masks a copy of the batch x
catalogue matrix and compares and sorts it. This script scores real batches of a trained model
once, then times both on the same scores, interleaved, and checks they agree.

    python benchmarks/evaluation_speed.py --workdir W            # W holds data/features and models/main
    python benchmarks/evaluation_speed.py --workdir W --batches 5 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.data.sequences import evaluation_batches, load_sequences  # noqa: E402
from pipeline.evaluation import metrics  # noqa: E402
from pipeline.models import scoring  # noqa: E402
from pipeline.models.sasrec import load_model  # noqa: E402


def rank_and_top(scores, batch, exclusion, k: int):
    greater, ties = scoring.target_rank_counts(scores, batch.targets, exclusion)
    _, top_scores = scoring.chunked_top_k(lambda start, stop: scores[:, start:stop], scores.shape[0], scores.shape[1], k,
                                          exclusion, scores.device)
    return greater, ties, top_scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--run-name", default="main")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--k", type=int, default=50, help="top-K for coverage (the largest of evaluate.ks)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root = Path(args.workdir)
    data = load_sequences(root / "data" / "features")
    model = load_model(root / "models" / args.run_name).eval()
    batches = []
    with torch.no_grad():
        for batch in evaluation_batches(data, "test", args.batch_size, model.cfg.max_len):
            scores = model.score(batch.inputs, batch.lengths).float()
            batches.append((scores, batch, metrics.seen_exclusion(data, batch, "test")))
            if len(batches) == args.batches:
                break
    kernels_for = scoring.kernels_for
    times: dict[str, list[float]] = {"numba": [], "torch": []}
    for _ in range(args.rounds):
        for backend in times:
            scoring.kernels_for = kernels_for if backend == "numba" else (lambda tensor: None)
            started = time.perf_counter()
            results = [rank_and_top(scores, batch, exclusion, args.k) for scores, batch, exclusion in batches]
            times[backend].append((time.perf_counter() - started) / len(batches))
            if backend == "numba":
                fast = results
            else:
                for (g1, t1, top1), (g2, t2, top2) in zip(fast, results):
                    assert torch.equal(g1, g2) and torch.equal(t1, t2), "ranks differ between the backends"
                    assert torch.equal(top1, top2), "top-K scores differ between the backends"
    scoring.kernels_for = kernels_for
    report = {"items": data.n_items, "batch_size": args.batch_size, "batches": len(batches), "threads": torch.get_num_threads(),
              **{f"{name}_ms_per_batch": 1000 * statistics.median(values) for name, values in times.items()}}
    report["speedup"] = report["torch_ms_per_batch"] / report["numba_ms_per_batch"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
