"""Full-ranking evaluation: the ranking work per batch, numba kernels against the torch path.

`pipeline.evaluation.metrics.evaluate` ranks each user's held-out item among every catalogue item
(seen items excluded) and takes everybody's top-K for coverage. On CPU that is one pass of
`target_rank_counts` and `chunked_top_k` (pipeline/models/scoring.py) over the scores; the torch
path (CUDA tensors, no numba; what every CPU evaluation did before) masks a copy of the batch x
catalogue matrix and compares and sorts it. This script scores real batches of a trained model
once, then times both on the same scores, interleaved, and checks they agree.

    python benchmarks/evaluation_speed.py --workdir W            # W holds data/features and models/main
    python benchmarks/evaluation_speed.py --workdir W --batches 5 --rounds 5

`--mode protocol` times `evaluate` end to end, the module of a git revision (`--baseline-rev`,
default 87944d0, the one before it) against the working tree's, on the same model and data: the valid split as each
epoch's validation runs it (NDCG/HR@10, no sampled protocols) and the test split as the evaluate
stage runs it (evaluate.ks, both sampled protocols, beyond-accuracy lists) for the teacher and the
popularity baseline; it prints seconds and which metrics are equal (`--users N`: a seeded sample).

    python benchmarks/evaluation_speed.py --workdir W --mode protocol --users 8192
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
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


def module_at(revision: str) -> types.ModuleType:
    """pipeline/evaluation/metrics.py as it was at `revision`, imported under its own name."""
    source = subprocess.run(["git", "show", f"{revision}:pipeline/evaluation/metrics.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType(f"metrics_{revision}")
    exec(compile(source, f"{revision}:pipeline/evaluation/metrics.py", "exec"), module.__dict__)  # noqa: S102
    return module


def protocol(args, data, model) -> None:
    from safetensors.torch import load_file

    from pipeline.core.config import load_params
    from pipeline.data.sequences import evaluation_rows
    from pipeline.models.baselines import popularity_scores

    params = load_params(ROOT / "params.yaml", [])
    old = module_at(args.baseline_rev)
    run = Path(args.workdir) / "models" / args.run_name
    vectors = load_file(str(run / "model.safetensors"))["item_embedding.weight"]
    popularity = popularity_scores(load_file(str(run / "baselines" / "popularity.safetensors"))["counts"].numpy())
    def padded(batch):  # every batch padded to max_len: scores that do not depend on how users are batched
        inputs = torch.nn.functional.pad(batch.inputs, (0, model.cfg.max_len - batch.inputs.shape[1]))
        return model.score(inputs, batch.lengths)

    validation = dict(ks=(10,), sampled_strategies=(), coverage=False)
    cases = [("valid", "sasrec", lambda b: model.score(b.inputs, b.lengths), model.cfg.max_len, validation),
             ("valid", "sasrec padded to max_len", padded, model.cfg.max_len, validation),
             *[("test", name, fn, max_len, dict(ks=params.evaluate.ks, sampled_strategies=params.evaluate.sampled_strategies,
                                                sampled_negatives=params.evaluate.sampled_negatives, beyond_accuracy=True,
                                                item_vectors=vectors))
               for name, fn, max_len in (("sasrec", lambda b: model.score(b.inputs, b.lengths), model.cfg.max_len),
                                         ("popularity", popularity, 1))]]
    rows = {split: evaluation_rows(data, split) for split in ("valid", "test")}
    if args.users:  # the same seeded sample for both modules: a SequenceData of those users only
        rows = {split: np.sort(np.random.default_rng(0).choice(r, min(args.users, len(r)), replace=False))
                for split, r in rows.items()}
    for split, name, fn, max_len, kwargs in cases:
        subset = subset_data(data, rows[split])
        common = dict(batch_size=params.evaluate.batch_size, max_len=max_len, seed=params.seed, progress=False, **kwargs)
        timings, results = {}, {}
        for label, module in (("old", old), ("new", metrics)):
            kw = {k: v for k, v in common.items() if k != "coverage" or label == "new"}  # the old module always took top-K
            module.evaluate(fn, subset_data(subset, np.arange(min(1024, len(rows[split])))), split, **kw)  # warm-up
            started = time.perf_counter()
            results[label] = module.evaluate(fn, subset, split, **kw)
            timings[label] = time.perf_counter() - started
        differ = {key: (results["old"][key], results["new"][key]) for key in results["old"]
                  if key in results["new"] and results["old"][key] != results["new"][key]}
        print(json.dumps({"split": split, "model": name, "users": int(results["new"]["users"]),
                          "old_s": round(timings["old"], 2), "new_s": round(timings["new"], 2),
                          "speedup": round(timings["old"] / timings["new"], 2),
                          "identical": [k for k in results["old"] if k in results["new"] and k not in differ],
                          "differ_old_new": differ}))


def subset_data(data, rows: np.ndarray):
    """The users at `rows` (positions in `data`) as a SequenceData of their own."""
    from pipeline.data.sequences import SequenceData

    lengths = data.offsets[rows + 1] - data.offsets[rows]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    items = np.concatenate([data.items[data.offsets[r]:data.offsets[r + 1]] for r in rows]) if len(rows) else data.items[:0]
    return SequenceData(data.users[rows], offsets, items, data.n_train[rows], data.n_valid[rows], data.n_test[rows],
                        data.n_items, data.n_user_index)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--run-name", default="main")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--k", type=int, default=50, help="top-K for coverage (the largest of evaluate.ks)")
    parser.add_argument("--mode", choices=("kernels", "protocol"), default="kernels")
    # 87944d0: the evaluate before the batched sampling and length-sorted scoring ("main" once meant it; it no longer does).
    parser.add_argument("--baseline-rev", default="87944d0", help="protocol: the git revision of the old evaluate")
    parser.add_argument("--users", type=int, default=0, help="protocol: a seeded sample of this many users (0: all)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    root = Path(args.workdir)
    data = load_sequences(root / "data" / "features")
    model = load_model(root / "models" / args.run_name).eval()
    if args.mode == "protocol":
        protocol(args, data, model)
        return
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
