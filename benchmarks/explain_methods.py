"""Explanation methods side by side: faithfulness on a trained tiny model, speed at the default model size.

Faithfulness: the tiny model of the test suite (tests/registry_helpers.build_trained), 200
users with at least 3 distinct items in the window; for each user's top recommendation, the
score drop (measured with `Recommender.scores`) when the method's top supporting item is
removed, against removing a random item of the window.

Speed: the default preset (`small`: d_model 64, 2 layers, max_len 50), random-init weights,
3,000 items, histories of 50 distinct items, 256 users x top-10, one thread; the median of
`--rounds` calls per method.

    python benchmarks/explain_methods.py --rounds 5

Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.data.sequences import load_sequences
from pipeline.models.explain import METHODS, explain
from pipeline.models.recommender import Recommender
from pipeline.models.sasrec import build_sasrec

logger = logging.getLogger(__name__)


def faithfulness(n_users: int = 200) -> dict:
    from tests.registry_helpers import build_trained

    with tempfile.TemporaryDirectory() as root:
        layout = build_trained(Path(root))
        data = load_sequences(layout.features_dir)
        rec = Recommender.load(layout.model_dir("main"))
    histories = [data.items[data.offsets[r] : data.offsets[r + 1]].tolist()[-rec.max_len :] for r in range(len(data.users))]
    histories = [h for h in histories if len(set(h)) >= 3][:n_users]
    items, _ = rec.recommend(histories, k=1)

    def drop(history: list[int], removed: int, target: int) -> float:
        rest = [i for i in history if i != removed] or [0]
        return float(rec.scores([history])[0, target] - rec.scores([rest])[0, target])

    out: dict = {}
    for method in METHODS:
        explained = explain(rec, histories, items.tolist(), top_n=1, method=method)
        rng = random.Random(0)
        top, rand = [], []
        for history, (target,), (because,) in zip(histories, items.tolist(), explained, strict=True):
            if because:
                top.append(drop(history, because[0][0], target))
                rand.append(drop(history, rng.choice(sorted(set(history))), target))
        out[method] = {"users": len(top), "mean_drop_top": float(np.mean(top)), "mean_drop_random": float(np.mean(rand))}
    return out


def speed(rounds: int, users: int = 256, k: int = 10) -> dict:
    torch.manual_seed(0)
    rec = Recommender(build_sasrec(3000, "small"))
    histories = [random.Random(u).sample(range(1, 3001), 50) for u in range(users)]
    items, _ = rec.recommend(histories, k=k)
    out = {}
    for method in METHODS:
        timings = []
        for _ in range(rounds):
            started = time.perf_counter()
            explain(rec, histories, items.tolist(), method=method)
            timings.append(time.perf_counter() - started)
        out[method] = {"median_s": round(statistics.median(timings), 3), "users": users, "k": k}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    summary = {"faithfulness": faithfulness(), "speed": speed(args.rounds), "threads": args.threads}
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
