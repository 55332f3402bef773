"""Stage `evaluate`: test-split metrics of the trained model and its baselines, and the compression report.

Writes reports/metrics.{json,md} (and logs them to the training run in MLflow); with
variants listed in `compress.variants`, also the side-by-side report of the teacher and its
variants (pipeline/evaluation/compression_report.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from pipeline.data.sequences import ScoreFn
from pipeline.evaluation.metrics import evaluate
from pipeline.evaluation.summary import METRICS_REPORT

logger = logging.getLogger(__name__)

HEADLINE = ("full/NDCG@10", "full/HR@10", "full/MRR", "full/Coverage@10")
# Beyond accuracy on the top-10 lists (pipeline/evaluation/metrics.py: BEYOND_ACCURACY).
BEYOND_HEADLINE = ("full/ILD@10", "full/Novelty@10", "full/Coverage@10", "full/Gini@10")


def load_scorers(run_dir: Path, device: torch.device) -> dict[str, tuple[ScoreFn, int]]:
    """Every model a train run produced, as (score function, max history length it reads)."""
    from safetensors.torch import load_file

    from pipeline.models.baselines import BPRMF, bpr_scores, popularity_scores
    from pipeline.models.sasrec import WEIGHTS_FILE, load_model

    scorers: dict[str, tuple[ScoreFn, int]] = {}
    if (run_dir / WEIGHTS_FILE).exists():
        model = load_model(run_dir, device)
        scorers["sasrec"] = (lambda b: model.score(b.inputs, b.lengths), model.cfg.max_len)
    baselines_dir = run_dir / "baselines"
    if (baselines_dir / "popularity.safetensors").exists():
        counts = load_file(str(baselines_dir / "popularity.safetensors"))["counts"].numpy()
        scorers["popularity"] = (popularity_scores(counts), 1)
    if (baselines_dir / "bpr.safetensors").exists():
        state = load_file(str(baselines_dir / "bpr.safetensors"))
        bpr = BPRMF(state["user.weight"].shape[0] - 1, state["item.weight"].shape[0] - 1, state["user.weight"].shape[1])
        bpr.load_state_dict(state)
        bpr = bpr.to(device).eval()
        scorers["bpr"] = (bpr_scores(bpr), 1)
    return scorers


def reference_item_vectors(run_dir: Path) -> tuple[torch.Tensor | None, str]:
    """The one item-vector space ILD is measured in for every model of a run, and its name: the
    SASRec teacher's item embedding table; without a teacher, the BPR baseline's item factors."""
    from safetensors.torch import load_file

    from pipeline.models.sasrec import WEIGHTS_FILE

    if (run_dir / WEIGHTS_FILE).exists():
        return load_file(str(run_dir / WEIGHTS_FILE))["item_embedding.weight"], "the SASRec teacher's item embedding table"
    if (run_dir / "baselines" / "bpr.safetensors").exists():
        return load_file(str(run_dir / "baselines" / "bpr.safetensors"))["item.weight"], "the BPR baseline's item factors"
    return None, "none (no SASRec teacher or BPR model: ILD not measured)"


def check_ks(ks: Iterable[int], n_items: int) -> None:
    """A cut-off above the catalogue has no top-k to take: refuse it, naming the setting and the catalogue's size."""
    from pipeline.core.errors import EvaluateError

    too_large = sorted(k for k in set(ks) if k > n_items)
    if too_large:
        raise EvaluateError(f"evaluate.ks {too_large} exceed the catalogue's {n_items:,} items: "
                            f"use cut-offs of at most {n_items:,}")


def markdown_table(results: dict[str, dict[str, float]], columns: Iterable[str] = HEADLINE) -> str:
    columns = list(columns)
    lines = ["| model | " + " | ".join(c.replace("full/", "") for c in columns) + " |", "| --- |" + " ---: |" * len(columns)]
    for name, metrics in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{metrics.get(c, float('nan')):.4f}" for c in columns) + " |")
    return "\n".join(lines)


def run_evaluate(eval_cfg, train_cfg, tracking, layout, seed: int, split: str = "test", compress_cfg=None) -> dict:
    """Test-split metrics of the trained model and its baselines -> reports/metrics.json and MLflow.

    With `compress_cfg` listing variants, the teacher and those variants are also measured side by
    side (quality, size, serving cost) -> reports/compression.{json,md,png} (pipeline/evaluation/compression_report.py).
    Variants not built yet (evaluate right after train) are named in the log, before any scoring, and in
    the compression report; the teacher and the variants that exist are measured all the same.
    """
    from pipeline.core.devices import select_device
    from pipeline.core.errors import EvaluateError
    from pipeline.core.io import atomic_path, write_json
    from pipeline.core.tracking import log_split_input, mlflow_run, read_run_id
    from pipeline.data.features import SEQUENCES_FILE
    from pipeline.data.sequences import load_sequences

    run_dir = layout.model_dir(train_cfg.run_name)
    if not (layout.features_dir / SEQUENCES_FILE).exists():
        raise EvaluateError(f"{layout.features_dir / SEQUENCES_FILE} not found: run the features and train stages first "
                            "(python -m pipeline features, python -m pipeline train)")
    data = load_sequences(layout.features_dir)
    check_ks(eval_cfg.ks, data.n_items)  # before any model is loaded or scored
    device = select_device(train_cfg.device, "train.device")
    scorers = load_scorers(run_dir, device)
    if not scorers:
        raise EvaluateError(f"no trained model in {run_dir}: run the train stage first (python -m pipeline train)")
    # What the compression report will measure, checked (and missing variants named) before any scoring.
    found = None
    if compress_cfg is not None and compress_cfg.variants:
        if "sasrec" in scorers:
            from pipeline.evaluation.compression_report import check_variants

            found = check_variants(compress_cfg, layout, train_cfg.run_name)
        else:
            logger.warning("no SASRec teacher in %s: no compression report (compress.variants are variants of it)", run_dir)
    item_vectors, space = reference_item_vectors(run_dir)
    results = {}
    for position, (name, (score_fn, max_len)) in enumerate(scorers.items(), start=1):
        started = time.perf_counter()
        results[name] = evaluate(
            score_fn, data, split, ks=eval_cfg.ks, batch_size=eval_cfg.batch_size, max_len=max_len, device=device,
            sampled_negatives=eval_cfg.sampled_negatives, sampled_strategies=eval_cfg.sampled_strategies, seed=seed,
            beyond_accuracy=True, item_vectors=item_vectors, desc=f"evaluate {position}/{len(scorers)} {name}",
        )
        logger.info("%d/%d %s (%d users in %.1fs): %s", position, len(scorers), name, results[name]["users"],
                    time.perf_counter() - started,
                    {k: round(results[name][k], 4) for k in (*HEADLINE, *BEYOND_HEADLINE) if k in results[name]})
    report = {"split": split, "item_vectors": space, "models": results}
    protocol = ("Full ranking over all items with each user's earlier items excluded (`full/*`); `sampled_*` rank the "
                f"held-out item against {eval_cfg.sampled_negatives} sampled unseen items, for comparison with papers only.")
    beyond = (f"Beyond accuracy, on each user's top-10 list: ILD@10 = 1 - mean pairwise cosine of the listed items in one "
              f"vector space for every model ({space}); Novelty@10 = mean -log2 of the items' share of the training "
              "interactions; Coverage@10 = share of the catalogue listed for anybody; Gini@10 = Gini index of exposure "
              "over every item (0: equal).")
    write_json(report, layout.reports_dir / METRICS_REPORT)
    with atomic_path(layout.reports_dir / "metrics.md") as tmp:
        tmp.write_text(f"# Test metrics ({split} split)\n\n{protocol}\n\n{markdown_table(results)}\n\n"
                       f"## Diversity and novelty\n\n{beyond}\n\n{markdown_table(results, BEYOND_HEADLINE)}\n",
                       encoding="utf-8")
    run_id = read_run_id(run_dir)
    with mlflow_run(tracking, layout.root, f"evaluate-{train_cfg.run_name}", run_id=run_id, system_metrics=False) as active:
        if active is not None:
            import mlflow

            mlflow.log_metrics({f"{split}.{name}.{metric.replace('@', '_at_')}": value
                                for name, metrics in results.items() for metric, value in metrics.items()})
            log_split_input(layout.features_dir / SEQUENCES_FILE, split)
            mlflow.log_dict(report, f"reports/{METRICS_REPORT}")
            mlflow.log_artifact(str(layout.reports_dir / "metrics.md"), "reports")
    if found is not None:
        from pipeline.evaluation.compression_report import run_compression_report

        report["compression"] = run_compression_report(compress_cfg, eval_cfg, train_cfg, tracking, layout, seed, found)
    return report
