"""Diversity re-ranking: NDCG@10 against intra-list diversity at a few MMR weights, on one trained SASRec.

ingest -> validate -> features -> train the teacher through the pipeline's own stage functions (or
reuse the teacher already in `--workdir`), then, on the test split, each user's top
CANDIDATES_PER_K x 10 candidates (seen items excluded, as the evaluator does) are re-ranked by MMR
(pipeline/models/rerank.py) at every weight in `--weights`, and the top-10 lists are measured by
pipeline/evaluation/metrics.py: NDCG@10 and HR@10 of the list, ILD@10 (in the teacher's item table),
Novelty@10, Coverage@10, Gini@10; and the re-ranking's own time per user.

    python benchmarks/diversity_tradeoff.py --dataset ml-100k --epochs 10
    python benchmarks/diversity_tradeoff.py --dataset ml-100k --workdir /tmp/div-ml100k --weights 0 0.1 0.2 0.3 0.5

Writes <out>/diversity-<dataset>.{json,md,png} (default out: reports/, not versioned); the chart
plots NDCG@10 against ILD@10, one labelled point per weight.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.data_pipeline import DATASETS  # noqa: E402
from pipeline.core.config import load_params  # noqa: E402
from pipeline.core.io import Layout  # noqa: E402
from pipeline.data.features import run_features  # noqa: E402
from pipeline.data.ingest import run_ingest  # noqa: E402
from pipeline.data.sequences import SequenceData, evaluation_batches, evaluation_rows, load_sequences  # noqa: E402
from pipeline.data.validation import run_validate  # noqa: E402
from pipeline.evaluation.metrics import ListMetrics, evaluate, seen_exclusion  # noqa: E402
from pipeline.models.rerank import candidate_count, mmr_rerank, unit_rows  # noqa: E402
from pipeline.models.sasrec import WEIGHTS_FILE, SASRec, load_model  # noqa: E402
from pipeline.training.train import run_train  # noqa: E402

logger = logging.getLogger("diversity_tradeoff")

DIVERSITY_DATASETS: dict[str, list[str]] = {
    "default": [],  # params.yaml as it is: the embedded synthetic default
    "synthetic-200k": ["ingest.synthetic.n_interactions=200000", "ingest.synthetic.n_items=3000"],  # the default before 2026-12-02
    "ml-100k": DATASETS["ml-100k"],  # ../shared/data/ml-100k, every rating an interaction
}
COMMON = ["tracking.enabled=false", "train.baselines=[]"]
K = 10


def teacher(dataset: str, workdir: Path, overrides: list[str]) -> tuple[Layout, SASRec, dict]:
    """The workdir's data and SASRec teacher: trained here unless one is already there."""
    params = load_params(ROOT / "params.yaml", [*DIVERSITY_DATASETS[dataset], *COMMON, *overrides])
    layout = Layout(workdir)
    run_dir = layout.model_dir(params.train.run_name)
    info: dict = {"reused": (run_dir / WEIGHTS_FILE).exists()}
    if not info["reused"]:
        run_ingest(params.ingest, layout, seed=params.seed)
        run_validate(params.validate_, layout)
        run_features(params.features, layout)
        started = time.perf_counter()
        run_train(params.train, params.tracking, layout, seed=params.seed)
        info["train_seconds"] = round(time.perf_counter() - started, 1)
    history = run_dir / "history.json"
    if history.exists():
        records = [r for r in json.loads(history.read_text()) if r["epoch"] >= 0]
        best = max(records, key=lambda r: r["valid_ndcg10"])
        info.update(epochs_run=len(records), best_epoch=best["epoch"] + 1, best_valid_ndcg10=round(best["valid_ndcg10"], 4))
    return layout, load_model(run_dir), info


def tradeoff(model: SASRec, data: SequenceData, weights: list[float], batch_size: int = 256) -> dict[float, dict]:
    """Every weight's top-10 list metrics on the test split, from the same candidates."""
    vectors = unit_rows(model.item_weights())
    n_candidates = candidate_count(K, data.n_items)
    lists = {w: ListMetrics([K], data.n_items, data.train_item_counts(), vectors) for w in weights}
    seconds = dict.fromkeys(weights, 0.0)
    with torch.inference_mode():
        for batch in evaluation_batches(data, "test", batch_size, model.cfg.max_len):
            user_vectors = model.last_hidden(batch.inputs, batch.lengths).float()
            candidates, scores = model.top_k(user_vectors, n_candidates, seen_exclusion(data, batch, "test"))
            for weight in weights:
                started = time.perf_counter()
                items, _ = mmr_rerank(candidates, scores, vectors, K, weight)
                seconds[weight] += time.perf_counter() - started
                lists[weight].add(items, batch.targets)
    results = {}
    for weight in weights:
        m = lists[weight].result()
        results[weight] = {"ndcg@10": m["full/NDCG@10"], "hr@10": m["full/HR@10"], "ild@10": m["full/ILD@10"],
                           "novelty@10": m["full/Novelty@10"], "coverage@10": m["full/Coverage@10"],
                           "gini@10": m["full/Gini@10"],
                           "rerank_ms_per_user": 1000 * seconds[weight] / lists[weight].n_lists}
    return results


def chart(report: dict, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["weights"]
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=120)
    ild = [r["ild@10"] for r in rows.values()]
    ndcg = [r["ndcg@10"] for r in rows.values()]
    ax.plot(ild, ndcg, "-o", color="tab:blue")
    for position, (weight, r) in enumerate(rows.items()):  # labels alternate above and below: close points stay legible
        ax.annotate(f"λ={weight}", (r["ild@10"], r["ndcg@10"]), xytext=(4, 6 if position % 2 else -12),
                    textcoords="offset points", fontsize=8)
    ax.set_xlabel("ILD@10 (1 - mean pairwise cosine, teacher's item table)")
    ax.set_ylabel("NDCG@10 (test split, full ranking)")
    ax.set_title(f"MMR re-ranking on {report['dataset']}: accuracy vs diversity")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(target, format="png")
    plt.close(fig)


def markdown(report: dict) -> str:
    lines = ["| λ | NDCG@10 | change | HR@10 | ILD@10 | Novelty@10 | Coverage@10 | Gini@10 | re-rank ms/user |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    base = report["weights"][min(report["weights"])]["ndcg@10"]
    for weight, r in report["weights"].items():
        lines.append(f"| {weight} | {r['ndcg@10']:.4f} | {r['ndcg@10'] / base - 1:+.1%} | {r['hr@10']:.4f} | "
                     f"{r['ild@10']:.4f} | {r['novelty@10']:.3f} | {r['coverage@10']:.4f} | {r['gini@10']:.4f} | "
                     f"{r['rerank_ms_per_user']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k", choices=list(DIVERSITY_DATASETS))
    parser.add_argument("--weights", nargs="+", type=float, default=[0.0, 0.1, 0.2, 0.3, 0.5])
    parser.add_argument("--epochs", type=int, default=10, help="training epochs of the teacher (early stopping may end sooner)")
    parser.add_argument("--workdir", default=None, help="keep data and the teacher here (reused when a teacher exists)")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], help="params override")
    parser.add_argument("--out", default=str(ROOT / "reports"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = [f"train.epochs={args.epochs}", *args.overrides]
    weights = sorted(set(args.weights))
    with tempfile.TemporaryDirectory(prefix=f"leanrec-diversity-{args.dataset}-") as tmp:
        layout, model, info = teacher(args.dataset, Path(args.workdir or tmp), overrides)
        data = load_sequences(layout.features_dir)
        started = time.perf_counter()
        rows = tradeoff(model, data, weights)
        seconds = time.perf_counter() - started
        # The evaluator's own full-ranking NDCG@10 of the same model: the lambda-0 lists must agree with it
        # (up to the evaluator's random tie-breaking).
        evaluator = evaluate(lambda b: model.score(b.inputs, b.lengths), data, "test", ks=(10,), max_len=model.cfg.max_len,
                             sampled_strategies=(), progress=False)["full/NDCG@10"]
    report = {"dataset": args.dataset, "overrides": overrides, "teacher": info, "test_users": len(evaluation_rows(data, "test")),
              "items": data.n_items, "candidates": candidate_count(K, data.n_items), "evaluator_ndcg@10": evaluator,
              "seconds": round(seconds, 1), "weights": rows,
              "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"diversity-{args.dataset}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"diversity-{args.dataset}.md").write_text(markdown(report))
    chart(report, out / f"diversity-{args.dataset}.png")
    logger.warning("evaluator NDCG@10 %.4f; teacher %s\n%s", evaluator, info, markdown(report))


if __name__ == "__main__":
    main()
