"""Sampled softmax on a million-item synthetic catalogue, trained by the train stage to a plateau (issue 13).

The chunked exact loss is FLOP-bound at this size (about 22 hours an epoch on 2 cores: the loss-scaling
mode of train_speed.py); sampled softmax with log-Q correction and sparse item-table updates is the
recipe that trains it on a CPU. This script builds the catalogue (ingest -> validate -> features with
`data_engine: duckdb`), runs the train stage (`run_train`, params.yaml plus the overrides below: early
stopping on validation NDCG@10 over a seeded user sample), then tests the best epoch's model and the
popularity baseline by full ranking over every item on a seeded sample of test users, and records each
epoch's time, the process's peak RSS and the plateau.

    python benchmarks/train_speed.py --mode catalogue            # 1.06M items, 9.1M training interactions
    python benchmarks/train_speed.py --mode catalogue --items 20000 --interactions 200000 --max-epochs 3   # a quick check

Writes benchmarks/results/train-catalogue-<items kept>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.train_speed import peak_rss_mib, prepare_overrides  # noqa: E402
from pipeline.core.config import load_params  # noqa: E402
from pipeline.core.io import Layout  # noqa: E402
from pipeline.data.sequences import load_sequences  # noqa: E402
from pipeline.evaluation.metrics import evaluate, validation_sample  # noqa: E402
from pipeline.models.baselines import popularity_scores  # noqa: E402
from pipeline.models.sasrec import load_model  # noqa: E402
from pipeline.training.train import run_train  # noqa: E402

logger = logging.getLogger("catalogue_training")


def overrides(args) -> list[str]:
    """params.yaml keys this benchmark sets; everything else is the default recipe."""
    return [
        "tracking.enabled=false", "data_engine=duckdb", "validate.data_docs=false",
        f"ingest.synthetic.n_interactions={args.interactions}", f"ingest.synthetic.n_items={args.items}",
        # A catalogue of 1M items with ~10 interactions each: the default 5-core filter would drop most of the tail.
        f"features.min_item_interactions={args.min_item_interactions}",
        "train.loss=sampled_softmax", f"train.n_negatives={args.negatives}", "train.sparse_item_updates=true",
        f"train.epochs={args.max_epochs}", f"train.early_stopping_patience={args.patience}",
        f"train.validation_users={args.validation_users}", "train.baselines=[]", *args.set,
    ]


def run(args) -> dict:
    settings = overrides(args)
    params = load_params(ROOT / "params.yaml", settings)
    with tempfile.TemporaryDirectory(prefix="leanrec-catalogue-") as tmp:
        layout = Layout(Path(args.workdir or tmp))
        started = time.perf_counter()
        if not (layout.features_dir / "sequences.parquet").exists():
            prepare_overrides(settings, layout.root)
        prepare_seconds = time.perf_counter() - started
        data = load_sequences(layout.features_dir)
        counts = data.train_item_counts()
        train_interactions = int(counts.sum())
        logger.info("catalogue: %d items, %d users, %d training interactions (prepared in %.0f s)",
                    data.n_items, len(data.users), train_interactions, prepare_seconds)
        result = run_train(params.train, params.tracking, layout, seed=params.seed, eval_batch_size=args.eval_batch_size)
        model = load_model(Path(result.run_dir))
        rows = validation_sample(data, args.test_users, params.seed + 1, split="test")
        tested = {}
        for name, score_fn in (("sasrec", lambda b: model.score(b.inputs, b.lengths)),
                               ("popularity", popularity_scores(counts))):
            begun = time.perf_counter()
            metrics = evaluate(score_fn, data, "test", ks=(10,), batch_size=args.eval_batch_size, max_len=model.cfg.max_len,
                               sampled_strategies=(), seed=params.seed, progress=True, rows=rows, coverage=False,
                               desc=f"test {name}")
            tested[name] = {"ndcg@10": metrics["full/NDCG@10"], "hr@10": metrics["full/HR@10"],
                            "seconds": time.perf_counter() - begun}
            logger.info("test %s: NDCG@10 %.4f HR@10 %.4f", name, metrics["full/NDCG@10"], metrics["full/HR@10"])
    history = [r for r in result.history if "train_seconds" in r]  # not the epoch -1 record of a warm start
    return {
        "catalogue": {"items": data.n_items, "users": len(data.users), "train_interactions": train_interactions,
                      "test_users_sampled": None if rows is None else len(rows)},
        "overrides": settings, "prepare_seconds": prepare_seconds,
        "epochs_run": result.epochs_run, "best_epoch": result.best_epoch, "best_valid_ndcg10": result.best_valid_ndcg10,
        "median_epoch_train_s": statistics.median(r["train_seconds"] for r in history) if history else None,
        "train_wall_s": result.seconds, "history": history, "test": tested, "parameters": result.parameters,
        "peak_rss_mib": peak_rss_mib(),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()},
    }


def markdown(report: dict) -> str:
    c = report["catalogue"]
    lines = [f"# Sampled softmax on {c['items']:,} items ({c['users']:,} users, {c['train_interactions']:,} training "
             f"interactions)", "", "| epoch | train s | tokens/s | valid s | valid NDCG@10 | loss |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["history"]:
        lines.append(f"| {r['epoch'] + 1} | {r['train_seconds']:.0f} | {r['tokens_per_s']:,.0f} | {r['valid_seconds']:.0f} | "
                     f"{r['valid_ndcg10']:.4f} | {r['loss']:.4f} |")
    lines += ["", f"best epoch {report['best_epoch'] + 1} of {report['epochs_run']}; peak RSS {report['peak_rss_mib']:,.0f} MiB", "",
              "| model | test NDCG@10 | HR@10 |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {t['ndcg@10']:.4f} | {t['hr@10']:.4f} |" for name, t in report["test"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Zipf(1) popularity leaves most generated items under 2 interactions: 3.5M generated keep 1.06M (docs/benchmarks.md).
    parser.add_argument("--items", type=int, default=3_500_000, help="items generated (features keeps fewer)")
    parser.add_argument("--interactions", type=int, default=11_000_000, help="interactions generated")
    parser.add_argument("--min-item-interactions", type=int, default=2)
    parser.add_argument("--negatives", type=int, default=1024)
    parser.add_argument("--max-epochs", type=int, default=30)
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--validation-users", type=int, default=5000)
    parser.add_argument("--test-users", type=int, default=20000)
    parser.add_argument("--eval-batch-size", type=int, default=128, help="users scored at once (x items floats)")
    parser.add_argument("--workdir", default=None, help="keep the data here (reused when its features exist)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE", help="a params override")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"train-catalogue-{report['catalogue']['items']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
