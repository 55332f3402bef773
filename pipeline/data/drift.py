"""Drift checks of a new batch of interactions against reference data (incremental updates).

Before an incremental run extends the vocabularies and fine-tunes the champion, its new
interactions are compared with the interactions the champion was trained on:

* `new_user_share` / `new_item_share`: the share of the batch's distinct users (items) that the
  reference never saw. New users are ordinary in online learning; a batch made mostly of unknown
  items usually means an ID change upstream.
* `popularity_tv`: total-variation distance between the item popularity distributions of the
  reference and of the batch (half the L1 distance over the union of items; 0 = identical, 1 =
  disjoint).
* `popularity_psi`: population stability index over popularity buckets of the items the
  reference knows. Reference items are ranked by popularity and cut into `psi_buckets` buckets
  holding equal shares of the reference interactions. PSI = sum (q - p) ln(q / p) over the
  buckets' interaction shares p (reference) and q (the batch's interactions with known items),
  each share floored at `PSI_EPSILON`. Rule of thumb: < 0.1 stable, 0.1-0.25 moderate, > 0.25 a
  real shift. New items are left out of PSI (a bucket the reference never fills would dominate
  it); `new_item_share` and `new_item_interaction_share` measure them.

Each metric has a threshold in `params.yaml` (`drift`); `run_drift` writes reports/drift.json and,
with `drift.action: fail`, stops with `DriftDetected` naming every check that failed.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core import schema
from pipeline.core.config import DriftConfig
from pipeline.core.errors import DriftDetected, IngestError
from pipeline.core.io import Layout, write_json

logger = logging.getLogger(__name__)

REPORT_FILE = "drift.json"
PSI_EPSILON = 1e-4


@dataclass
class DriftResult:
    success: bool
    metrics: dict[str, float]
    checks: list[dict] = field(default_factory=list)  # {check, value, threshold, success}
    counts: dict[str, int] = field(default_factory=dict)


def popularity_buckets(reference_counts: pd.Series, n_buckets: int) -> pd.Series:
    """Bucket of each reference item (0 = most popular): equal shares of reference interactions."""
    ordered = reference_counts.sort_values(ascending=False, kind="stable")
    cumulative_before = (ordered.cumsum() - ordered) / ordered.sum()
    buckets = np.minimum((cumulative_before.to_numpy() * n_buckets).astype(np.int64), n_buckets - 1)
    return pd.Series(buckets, index=ordered.index)


def total_variation(p: pd.Series, q: pd.Series) -> float:
    p, q = p.align(q, fill_value=0.0)
    return float(0.5 * np.abs(p.to_numpy() - q.to_numpy()).sum())


def psi(p: np.ndarray, q: np.ndarray, epsilon: float = PSI_EPSILON) -> float:
    p, q = np.maximum(p, epsilon), np.maximum(q, epsilon)
    return float(((q - p) * np.log(q / p)).sum())


def drift_checks(reference: pd.DataFrame, batch: pd.DataFrame, cfg: DriftConfig) -> DriftResult:
    """Compare `batch` with `reference` (both with user_id and item_id columns)."""
    for name, frame in (("reference", reference), ("batch", batch)):
        missing = {schema.USER, schema.ITEM} - set(frame.columns)
        if missing:
            raise IngestError(f"drift: the {name} interactions lack columns {sorted(missing)}")
        if frame.empty:
            raise IngestError(f"drift: the {name} interactions are empty")
    ref_users, ref_counts = set(reference[schema.USER].unique()), reference[schema.ITEM].value_counts()
    batch_users, batch_counts = batch[schema.USER].unique(), batch[schema.ITEM].value_counts()

    new_users = int(sum(1 for user in batch_users if user not in ref_users))
    new_items_mask = ~batch_counts.index.isin(ref_counts.index)
    p_items, q_items = ref_counts / ref_counts.sum(), batch_counts / batch_counts.sum()

    buckets = popularity_buckets(ref_counts, cfg.psi_buckets)
    p = np.bincount(buckets.to_numpy(), weights=p_items.reindex(buckets.index).to_numpy(), minlength=cfg.psi_buckets)
    known_counts = batch_counts[~new_items_mask]
    q = np.bincount(buckets.reindex(known_counts.index).to_numpy(), weights=known_counts.to_numpy(dtype=float),
                    minlength=cfg.psi_buckets)
    q = q / q.sum() if q.sum() > 0 else q  # no known item at all: every bucket at the floor

    metrics = {
        "new_user_share": new_users / len(batch_users),
        "new_item_share": float(new_items_mask.sum()) / len(batch_counts),
        "new_item_interaction_share": float(q_items[new_items_mask].sum()),
        "popularity_tv": total_variation(p_items, q_items),
        "popularity_psi": psi(p, q),
    }
    thresholds = {
        "new_user_share": cfg.max_new_user_share,
        "new_item_share": cfg.max_new_item_share,
        "popularity_tv": cfg.max_popularity_tv,
        "popularity_psi": cfg.max_popularity_psi,
    }
    checks = [
        {"check": name, "value": round(metrics[name], 6), "threshold": limit, "success": metrics[name] <= limit}
        for name, limit in thresholds.items()
    ]
    counts = {
        "reference_interactions": len(reference), "batch_interactions": len(batch),
        "batch_users": len(batch_users), "new_users": new_users,
        "batch_items": len(batch_counts), "new_items": int(new_items_mask.sum()),
    }
    return DriftResult(success=all(c["success"] for c in checks), metrics=metrics, checks=checks, counts=counts)


def run_drift(cfg: DriftConfig, layout: Layout, reference: str | Path) -> DriftResult:
    """Check `layout.validated_interactions` against the `reference` interactions (a Parquet file)."""
    reference = Path(reference)
    columns = [schema.USER, schema.ITEM]
    for path in (reference, layout.validated_interactions):
        if not path.exists():
            raise IngestError(f"drift: {path} not found")
    result = drift_checks(pd.read_parquet(reference, columns=columns),
                          pd.read_parquet(layout.validated_interactions, columns=columns), cfg)
    report_path = layout.reports_dir / REPORT_FILE
    write_json({"reference": str(reference), "batch": str(layout.validated_interactions), "action": cfg.action,
                **asdict(result)}, report_path)
    failed = [c for c in result.checks if not c["success"]]
    for check in result.checks:
        logger.info("drift: %s = %.4f (threshold %s)%s", check["check"], check["value"], check["threshold"],
                    "" if check["success"] else "  FAILED")
    if failed:
        summary = "; ".join(f"{c['check']} {c['value']:.4f} > {c['threshold']}" for c in failed)
        if cfg.action == "fail":
            raise DriftDetected(f"drift of {layout.validated_interactions} against {reference}: {summary}; see {report_path}")
        logger.warning("drift: %s (drift.action=warn: continuing)", summary)
    return result
