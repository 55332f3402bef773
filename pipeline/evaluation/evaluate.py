"""Ranking evaluation used by every stage that scores a model.

Full ranking (the default protocol): every catalogue item is scored, the
user's earlier items are excluded, and the held-out item's rank gives HR@K,
NDCG@K, Recall@K (= HR@K with one held-out item) and MRR; coverage@K is the
share of the catalogue that appears in anybody's top K.

Sampled protocols, as in many papers: the held-out item is ranked against 100
sampled negatives (uniformly or by popularity). They inflate the numbers and
are reported under their own labels, only so results can be compared with
published tables.

Ties are broken at random (seeded): a constant scorer must not get credit
for the order items happen to have in the vocabulary.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.data.sequences import Batch, SequenceData, evaluation_batches, evaluation_rows, seen_items

logger = logging.getLogger(__name__)

ScoreFn = Callable[[Batch], torch.Tensor]  # batch -> (B, n_items + 1) scores on any device


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """0-based rank of each target among its row's scores, ties broken uniformly at random."""
    target_scores = scores.gather(1, targets.view(-1, 1))
    greater = (scores > target_scores).sum(1)
    ties = (scores == target_scores).sum(1) - 1  # other items with exactly the target's score
    if generator is None:
        return greater
    # A random position among the tied items: floor(u * (ties + 1)).
    u = torch.rand(len(targets), generator=generator, device="cpu").to(scores.device)
    return greater + torch.floor(u * (ties + 1)).long()


def metrics_from_ranks(ranks: torch.Tensor, ks: Iterable[int]) -> dict[str, torch.Tensor]:
    """Per-example metric values (so batches can be summed) from 0-based ranks."""
    ranks = ranks.double()
    out = {"MRR": 1.0 / (ranks + 1.0)}
    for k in ks:
        hit = (ranks < k).double()
        out[f"HR@{k}"] = hit
        out[f"Recall@{k}"] = hit  # one held-out item per user: recall equals hit rate
        out[f"NDCG@{k}"] = hit / torch.log2(ranks + 2.0)
    return out


def _exclude_seen(scores: torch.Tensor, data: SequenceData, batch: Batch, split: str) -> torch.Tensor:
    scores = scores.float().clone()
    batch_rows, items = seen_items(data, batch.rows, split)
    target_scores = scores.gather(1, batch.targets.view(-1, 1).to(scores.device))
    scores[torch.from_numpy(batch_rows).to(scores.device), torch.from_numpy(items).to(scores.device)] = float("-inf")
    scores[:, 0] = float("-inf")  # padding is never a recommendation
    # A re-consumed target (possible without de-duplication) stays rankable.
    scores.scatter_(1, batch.targets.view(-1, 1).to(scores.device), target_scores)
    return scores


def evaluate(
    score_fn: ScoreFn,
    data: SequenceData,
    split: str = "test",
    ks: Iterable[int] = (10, 20, 50),
    batch_size: int = 512,
    max_len: int = 200,
    device: torch.device | str = "cpu",
    sampled_negatives: int = 100,
    sampled_strategies: Iterable[str] = ("uniform", "popularity"),
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Metrics of `score_fn` on `split` ("valid" or "test"), averaged over users with a target."""
    ks = sorted(set(int(k) for k in ks))
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    sampled_strategies = tuple(sampled_strategies)
    # Only the popularity-sampled protocol needs the counts; per-epoch validation skips it.
    popularity = torch.from_numpy(data.train_item_counts()).double().to(device) if "popularity" in sampled_strategies else None
    totals: dict[str, float] = {}
    top_items = {k: torch.zeros(data.n_items + 1, dtype=torch.bool, device=device) for k in ks}
    n_users = 0
    batches = evaluation_batches(data, split, batch_size, max_len)
    n_batches = -(-len(evaluation_rows(data, split)) // batch_size)
    with torch.no_grad():
        for batch in tqdm(batches, total=n_batches, desc=f"evaluate[{split}]", unit="batch", disable=not progress or None):
            batch = batch.to(device)
            scores = _exclude_seen(score_fn(batch), data, batch, split)
            ranks = target_ranks(scores, batch.targets, generator)
            for name, values in metrics_from_ranks(ranks, ks).items():
                totals[f"full/{name}"] = totals.get(f"full/{name}", 0.0) + float(values.sum())
            top = torch.topk(scores, max(ks), dim=1).indices
            for k in ks:
                top_items[k][top[:, :k].reshape(-1)] = True
            for strategy in sampled_strategies:
                sampled_ranks = _sampled_ranks(scores, batch.targets, popularity, strategy, sampled_negatives, generator)
                for name, values in metrics_from_ranks(sampled_ranks, [k for k in ks if k <= sampled_negatives]).items():
                    key = f"sampled_{strategy}_{sampled_negatives}/{name}"
                    totals[key] = totals.get(key, 0.0) + float(values.sum())
            n_users += len(batch.rows)
    if n_users == 0:
        raise ValueError(f"no users with a {split} target to evaluate")
    metrics = {name: total / n_users for name, total in totals.items()}
    for k in ks:
        metrics[f"full/Coverage@{k}"] = float(top_items[k][1:].sum()) / data.n_items
    metrics["users"] = float(n_users)
    return metrics


def _sampled_ranks(
    scores: torch.Tensor, targets: torch.Tensor, popularity: torch.Tensor | None, strategy: str, n_negatives: int, generator: torch.Generator
) -> torch.Tensor:
    """Rank of the target among `n_negatives` sampled items the user has not seen."""
    allowed = torch.isfinite(scores)  # seen items and padding were set to -inf
    allowed.scatter_(1, targets.view(-1, 1), False)
    if strategy == "uniform":
        weights = allowed.double()
    elif strategy == "popularity":
        weights = allowed.double() * (popularity + 1.0)  # +1: never-trained items can still be drawn
    else:
        raise ValueError(f"unknown sampling strategy {strategy!r}")
    weights = weights.cpu()
    n_allowed = int(allowed.sum(1).min())
    draws = torch.multinomial(weights, min(n_negatives, n_allowed), replacement=False, generator=generator).to(scores.device)
    candidates = torch.cat([targets.view(-1, 1), draws], dim=1)
    return target_ranks(scores.gather(1, candidates), torch.zeros_like(targets), generator)


def popularity_scores(counts: np.ndarray) -> ScoreFn:
    table = torch.from_numpy(counts.astype(np.float32))

    def score(batch: Batch) -> torch.Tensor:
        return table.to(batch.inputs.device).expand(len(batch.rows), -1)

    return score


# ----------------------------------------------------------------------------- the stage

METRICS_REPORT = "metrics.json"
HEADLINE = ("full/NDCG@10", "full/HR@10", "full/MRR", "full/Coverage@10")


def load_scorers(run_dir: Path, device: torch.device) -> dict[str, tuple[ScoreFn, int]]:
    """Every model a train run produced, as (score function, max history length it reads)."""
    from safetensors.torch import load_file

    from pipeline.models.baselines import BPRMF, bpr_scores
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
    """
    from pipeline.core.io import atomic_path, write_json
    from pipeline.data.sequences import load_sequences
    from pipeline.core.tracking import mlflow_run, read_run_id
    from pipeline.training.train import TrainError, select_device

    run_dir = layout.model_dir(train_cfg.run_name)
    device = select_device(train_cfg)
    scorers = load_scorers(run_dir, device)
    if not scorers:
        raise TrainError(f"no trained model in {run_dir}: run the train stage first")
    data = load_sequences(layout.features_dir)
    results = {}
    for name, (score_fn, max_len) in scorers.items():
        results[name] = evaluate(
            score_fn, data, split, ks=eval_cfg.ks, batch_size=eval_cfg.batch_size, max_len=max_len, device=device,
            sampled_negatives=eval_cfg.sampled_negatives, sampled_strategies=eval_cfg.sampled_strategies, seed=seed,
        )
        logger.info("%s: %s", name, {k: round(results[name][k], 4) for k in HEADLINE})
    report = {"split": split, "models": results}
    protocol = ("Full ranking over all items with each user's earlier items excluded (`full/*`); `sampled_*` rank the "
                f"held-out item against {eval_cfg.sampled_negatives} sampled unseen items, for comparison with papers only.")
    write_json(report, layout.reports_dir / METRICS_REPORT)
    with atomic_path(layout.reports_dir / "metrics.md") as tmp:
        tmp.write_text(f"# Test metrics ({split} split)\n\n{protocol}\n\n{markdown_table(results)}\n", encoding="utf-8")
    run_id = read_run_id(run_dir)
    with mlflow_run(tracking, layout.root, f"evaluate-{train_cfg.run_name}", run_id=run_id, system_metrics=False) as active:
        if active is not None:
            import mlflow

            mlflow.log_metrics({f"{split}.{name}.{metric.replace('@', '_at_')}": value
                                for name, metrics in results.items() for metric, value in metrics.items()})
            mlflow.log_dict(report, f"reports/{METRICS_REPORT}")
            mlflow.log_artifact(str(layout.reports_dir / "metrics.md"), "reports")
    if compress_cfg is not None and compress_cfg.variants and "sasrec" in scorers:
        from pipeline.evaluation.compression_report import run_compression_report

        report["compression"] = run_compression_report(compress_cfg, eval_cfg, train_cfg, tracking, layout, seed)
    return report
