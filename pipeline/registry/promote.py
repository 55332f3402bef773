"""Promotion gate and rollback on the MLflow registry.

- `promote`: the challenger and the current champion are both scored on the
  *current* test split (data/features); the `champion` alias moves to the
  challenger only if its NDCG@10 is not below the champion's by more than
  `registry.ndcg_tolerance` (relative) and its CPU p50 latency is within
  `registry.policy.max_latency_p50_ms`. With no champion yet, the challenger
  becomes champion if it is within the latency budget. Decision and figures go to
  the version's tags and reports/promotion.json.
- `rollback`: `champion` moves back to the version it replaced (recorded in the
  `leanrec.previous_champion` tag when it was promoted).

Aliases only (model stages are deprecated). Safety guarantees, and what they
rest on:
- Once a champion exists, `champion` always names an existing version: aliases
  are only ever *overwritten* (one upsert in the store: SQL row or REST call),
  never deleted then re-set, and versions are never deleted here.
- An error before the alias moves leaves every alias as it was; an error after
  it moved (tags, report) moves it back before the error is raised.
- Two promotions at once are not serialised (neither SQLite nor the REST API
  offers an atomic compare-and-set on aliases): each is checked against the
  champion it read, and the last alias write wins. The registry is never left
  without a champion, and the winner passed its gate against a valid champion;
  the loser notices the alias is no longer its version and reports `superseded`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.core.config import RegistryConfig, TrackingConfig
from pipeline.core.errors import RegistryError
from pipeline.core.io import Layout, write_json
from pipeline.registry.store import (
    CHALLENGER,
    CHAMPION,
    PROMOTION_REPORT,
    TAG_DECISION,
    TAG_PREVIOUS,
    TAG_ROLLED_BACK,
    alias_version,
    load_servable,
    registry_client,
    tag_key,
    utc_now,
)

logger = logging.getLogger(__name__)


def score_on_split(servable: Any, features_dir: Path, split: str = "test", seed: int = 0, batch_size: int = 512) -> dict[str, float]:
    """NDCG@10 and HR@10 of a servable on the current features' split.

    The model may know another vocabulary than the current features (it was registered on
    older data): items are matched by raw ID, histories keep only items the model knows,
    items it does not know cannot be recommended, and users with no known item get the
    model's popularity ranking.
    """
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from pipeline.data.features import ITEM_VOCAB_FILE
    from pipeline.data.sequences import load_sequences
    from pipeline.evaluation.metrics import evaluate

    data = load_sequences(features_dir)
    to_model = servable.index_map(pq.read_table(features_dir / ITEM_VOCAB_FILE).to_pandas())
    identical = bool(np.array_equal(to_model, np.arange(data.n_items + 1))) and servable.n_items == data.n_items
    to_model_t = torch.from_numpy(to_model)
    unknown_columns = to_model_t == 0
    popularity = torch.from_numpy(servable.popularity).float()
    model = servable.recommender.model
    device = servable.recommender.device

    def score(batch: Any) -> torch.Tensor:
        inputs, lengths = batch.inputs.cpu(), batch.lengths.cpu()
        if identical:
            return model.score(inputs.to(device), lengths.to(device)).float().cpu()
        mapped = to_model_t[inputs]
        rows = []
        for row in range(len(inputs)):
            kept = mapped[row, : lengths[row]]
            rows.append(kept[kept > 0])
        new_lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        out = popularity.expand(len(rows), -1).clone()
        has = torch.nonzero(new_lengths > 0).flatten()
        if len(has):
            padded = torch.zeros(len(has), int(new_lengths[has].max()), dtype=torch.long)
            for i, row in enumerate(has.tolist()):
                padded[i, : len(rows[row])] = rows[row]
            out[has] = model.score(padded.to(device), new_lengths[has].to(device)).float().cpu()
        scores = out[:, to_model_t]  # model columns -> current columns
        scores[:, unknown_columns] = float("-inf")
        return scores

    metrics = evaluate(score, data, split, ks=(10,), batch_size=batch_size, max_len=servable.recommender.max_len,
                       device="cpu", sampled_strategies=(), seed=seed, progress=False)
    return {"ndcg@10": metrics["full/NDCG@10"], "hr@10": metrics["full/HR@10"], "users": metrics["users"]}


def _float_tag(version: Any, figure: str) -> float | None:
    value = version.tags.get(tag_key(figure))
    try:
        return None if value in (None, "") else float(value)
    except ValueError:
        return None


def decide(cfg: RegistryConfig, challenger: dict, champion: dict | None) -> tuple[bool, list[str]]:
    """The gate: (promote?, reasons). Figures are dicts with ndcg@10 and latency_p50_ms."""
    reasons = []
    budget = cfg.policy.max_latency_p50_ms
    latency = challenger.get("latency_p50_ms")
    within_latency = budget is None or (latency is not None and latency <= budget)
    if not within_latency:
        reasons.append(f"challenger latency_p50_ms {latency} is over the budget {budget}")
    not_worse = True
    if champion is not None:
        floor = champion["ndcg@10"] * (1.0 - cfg.ndcg_tolerance)
        not_worse = challenger["ndcg@10"] >= floor
        comparison = ">=" if not_worse else "<"
        reasons.append(f"challenger NDCG@10 {challenger['ndcg@10']:.5f} {comparison} {floor:.5f} "
                       f"(champion {champion['ndcg@10']:.5f} less {cfg.ndcg_tolerance:.1%})")
    else:
        reasons.append("no champion yet")
    return within_latency and not_worse, reasons


def promote(cfg: RegistryConfig, tracking: TrackingConfig, layout: Layout, version: str | None = None, seed: int = 0) -> dict:
    """Gate the challenger (or `version`) against the champion; move `champion` only if it passes."""
    client = registry_client(tracking, layout.root)
    name = cfg.model_name
    if version is not None:
        challenger = client.get_model_version(name, str(version))
    else:
        challenger = alias_version(client, name, CHALLENGER)
        if challenger is None:
            raise RegistryError(f"{name} has no {CHALLENGER!r} alias: run the register stage first")
    champion = alias_version(client, name, CHAMPION)
    from pipeline.core.tracking import directory_sha256

    report: dict[str, Any] = {
        "model_name": name, "challenger_version": str(challenger.version),
        "champion_version": None if champion is None else str(champion.version),
        "split": "test", "features_sha256": directory_sha256(layout.features_dir), "at": utc_now(),
        "ndcg_tolerance": cfg.ndcg_tolerance, "max_latency_p50_ms": cfg.policy.max_latency_p50_ms,
    }
    if champion is not None and str(champion.version) == str(challenger.version):
        report.update(decision="unchanged", promoted=False, reasons=["the challenger is already the champion"],
                      champion_after=str(champion.version))
        write_json(report, layout.reports_dir / PROMOTION_REPORT)
        return report

    challenger_figures = score_on_split(load_servable(name, challenger.version), layout.features_dir, seed=seed)
    challenger_figures["latency_p50_ms"] = _float_tag(challenger, "latency_p50_ms")
    champion_figures = None
    if champion is not None:
        champion_figures = score_on_split(load_servable(name, champion.version), layout.features_dir, seed=seed)
        champion_figures["latency_p50_ms"] = _float_tag(champion, "latency_p50_ms")
    promoted, reasons = decide(cfg, challenger_figures, champion_figures)
    if challenger.tags.get(TAG_ROLLED_BACK):
        promoted = False
        reasons.append(f"version {challenger.version} was rolled back at {challenger.tags[TAG_ROLLED_BACK]}; "
                       "register a new model to try again")
    report.update(challenger=challenger_figures, champion=champion_figures, promoted=promoted, reasons=reasons,
                  decision="promoted" if promoted else "rejected")
    logger.info("promotion of %s version %s: %s (%s)", name, challenger.version, report["decision"], "; ".join(reasons))

    moved = False
    try:
        if promoted:
            previous = "" if champion is None else str(champion.version)
            client.set_model_version_tag(name, challenger.version, TAG_PREVIOUS, previous or "none")
            # The single write that promotes: an overwrite, so `champion` never points nowhere.
            client.set_registered_model_alias(name, CHAMPION, challenger.version)
            moved = True
            after = alias_version(client, name, CHAMPION)
            report["champion_after"] = None if after is None else str(after.version)
            if report["champion_after"] != str(challenger.version):
                report["decision"] = "superseded"
                logger.warning("a concurrent promotion moved %s to version %s after this one", CHAMPION, report["champion_after"])
        else:
            report["champion_after"] = report["champion_version"]
        figures = {
            TAG_DECISION: report["decision"],
            "leanrec.promotion.at": report["at"],
            "leanrec.promotion.champion_version": report["champion_version"] or "none",
            "leanrec.promotion.reasons": "; ".join(reasons)[:5000],
            "leanrec.promotion.challenger_ndcg_at_10": f"{challenger_figures['ndcg@10']:.6f}",
        }
        if champion_figures is not None:
            figures["leanrec.promotion.champion_ndcg_at_10"] = f"{champion_figures['ndcg@10']:.6f}"
        for key, value in figures.items():
            client.set_model_version_tag(name, challenger.version, key, value)
        write_json(report, layout.reports_dir / PROMOTION_REPORT)
    except Exception as err:
        if moved:
            _restore_champion(client, name, champion)
        raise RegistryError(f"promotion of {name} version {challenger.version} failed, aliases left as they were: {err}") from err
    return report


def _restore_champion(client: Any, name: str, champion: Any | None) -> None:
    if champion is not None:
        client.set_registered_model_alias(name, CHAMPION, champion.version)
    else:
        client.delete_registered_model_alias(name, CHAMPION)
    logger.warning("%s alias restored to %s", CHAMPION, "none" if champion is None else champion.version)


def rollback(cfg: RegistryConfig, tracking: TrackingConfig, layout: Layout) -> dict:
    """Move `champion` back to the version the current champion replaced."""
    client = registry_client(tracking, layout.root)
    name = cfg.model_name
    champion = alias_version(client, name, CHAMPION)
    if champion is None:
        raise RegistryError(f"{name} has no {CHAMPION!r}: nothing to roll back")
    previous = champion.tags.get(TAG_PREVIOUS, "none")
    if previous in ("", "none"):
        raise RegistryError(f"{name} version {champion.version} was the first champion: there is no previous one to roll back to")
    client.get_model_version(name, previous)  # fails clearly if that version is gone
    client.set_registered_model_alias(name, CHAMPION, previous)
    at = utc_now()
    client.set_model_version_tag(name, champion.version, TAG_ROLLED_BACK, at)
    logger.info("%s: %s moved back from version %s to %s", name, CHAMPION, champion.version, previous)
    return {"model_name": name, "rolled_back": str(champion.version), "champion": str(previous), "at": at}
