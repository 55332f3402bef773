"""Promotion gate and rollback on the MLflow registry.

- `promote`: the challenger and the reference champion are both scored on the
  *current* test split (data/features); the `champion` alias moves to the
  challenger only if its NDCG@10 is not below the champion's by more than
  `registry.ndcg_tolerance` (relative) and its CPU p50 latency is within
  `registry.policy.max_latency_p50_ms`. With no champion ever, the challenger
  becomes champion if it is within the latency budget. Decision and figures go to
  the version's tags, its description (in words) and reports/promotion.json.
- The reference champion is the one the alias names, or, when that version was
  deleted or its artifacts are corrupt, the newest earlier champion of the
  history (`leanrec.champion_history`) that still loads and verifies; when none
  does, promote refuses and says what to do, never "no champion yet".
- Like with like (`comparability`): the gate refuses when the current split
  cannot judge the champion fairly, i.e. its test users' histories are not
  (a continuation of) the ones the champion was registered with, or the
  champion knows too few of the test targets. A smoke run on other data can
  therefore never replace a real champion.
- `rollback`: `champion` moves back to the version it replaced (recorded in the
  `leanrec.previous_champion` tag when it was promoted), or to the newest
  earlier champion that still exists when that one is gone.

Aliases only (model stages are deprecated). Safety guarantees, and what they
rest on:
- Promotions and rollbacks of one model are serialised by a lock the store
  enforces (`store.promotion_lock`: a registered model created as the lock, whose
  unique name makes acquiring it an atomic compare-and-set over SQL or REST).
  The second of two concurrent promotions waits, then is gated against the
  first one's result; an alias moved meanwhile without the lock (by hand) is
  noticed before the write and reported `superseded`, not overwritten.
- Once a champion exists, `champion` always names an existing version: aliases
  are only ever *overwritten* (one upsert in the store), never deleted then re-set.
- An error before the alias moves leaves every alias as it was; an error after
  it moved (tags, report) moves it back before the error is raised.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.config import RegistryConfig, TrackingConfig
from pipeline.core.errors import RegistryError
from pipeline.core.io import Layout, write_json
from pipeline.registry.describe import describe_version
from pipeline.registry.store import (
    CHALLENGER,
    CHAMPION,
    PROMOTION_REPORT,
    TAG_DECISION,
    TAG_PREVIOUS,
    TAG_ROLLED_BACK,
    alias_version,
    champion_history,
    get_version,
    load_servable,
    promotion_lock,
    record_champion,
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


COMPARABILITY_USERS = 5000  # test users sampled for the history agreement (seeded)


def comparability(servable: Any, features_dir: Path, cfg: RegistryConfig, seed: int = 0) -> tuple[bool, dict, list[str]]:
    """Can the current test split judge this (champion) model fairly? (comparable, figures, reasons)

    - history agreement: for test users the model knows, the share of the items it was registered
      with for them that are still in their current sequence (1.0 on the same data, about 1.0 when the
      data grew by appending; low when the same IDs name other people, e.g. another synthetic draw);
    - target coverage: the share of test targets the model knows (it can never recommend the others).
    """
    import numpy as np
    import pyarrow.parquet as pq

    from pipeline.data.features import ITEM_VOCAB_FILE, USER_VOCAB_FILE
    from pipeline.data.sequences import load_sequences

    data = load_sequences(features_dir)
    to_model = servable.index_map(pq.read_table(features_dir / ITEM_VOCAB_FILE).to_pandas())
    user_vocab = pq.read_table(features_dir / USER_VOCAB_FILE).to_pandas()
    raw_user = dict(zip(user_vocab["index"].tolist(), user_vocab["id"].tolist(), strict=True))
    rows = np.flatnonzero(data.n_test > 0)
    targets = data.items[data.offsets[rows] + data.n_train[rows] + data.n_valid[rows]]
    coverage = float(np.mean(to_model[targets] > 0)) if len(rows) else 0.0
    known = [int(r) for r in rows if servable.user_history(raw_user[int(data.users[r])]) is not None]
    rng = np.random.default_rng(seed)
    sample = known if len(known) <= COMPARABILITY_USERS else rng.choice(known, COMPARABILITY_USERS, replace=False).tolist()
    agreements = []
    for row in sample:
        registered = set(servable.user_history(raw_user[int(data.users[row])]).tolist())
        current = set(to_model[data.items[data.offsets[row] : data.offsets[row + 1]]].tolist())
        if registered:
            agreements.append(len(registered & current) / len(registered))
    agreement = float(np.mean(agreements)) if agreements else None
    figures = {"test_users": len(rows), "users_known": len(known), "history_agreement": agreement,
               "target_coverage": coverage}
    reasons = []
    if coverage < cfg.min_target_coverage:
        reasons.append(f"the champion knows {coverage:.1%} of this split's test targets, under "
                       f"registry.min_target_coverage {cfg.min_target_coverage:.0%}: another catalogue")
    if cfg.min_history_agreement > 0:
        if agreement is None:
            reasons.append("no test user of this split is known to the champion: nothing shows the data are the same "
                           "(registry.min_history_agreement=0 gates on the catalogue alone)")
        elif agreement < cfg.min_history_agreement:
            reasons.append(f"the test users' histories hold {agreement:.1%} of the items the champion was registered "
                           f"with for them, under registry.min_history_agreement {cfg.min_history_agreement:.0%}: other data")
    return not reasons, figures, reasons


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


@dataclass
class Reference:
    """The champion the gate compares against, and why the ones tried before it could not be."""

    version: Any | None = None
    servable: Any | None = None
    skipped: list[str] = field(default_factory=list)
    ever: bool = False  # was there ever a champion (alias or history)?


def reference_champion(client: Any, name: str, alias: Any | None, exclude: str) -> Reference:
    """The alias's version when it loads and verifies, else the newest earlier healthy champion."""
    history = [entry["version"] for entry in reversed(champion_history(client, name)) if entry.get("event") == "promoted"]
    candidates = ([str(alias.version)] if alias is not None else []) + history
    reference = Reference(ever=bool(candidates))
    seen: set[str] = set()
    for version in candidates:
        if version in seen or version == exclude:
            continue
        seen.add(version)
        try:
            model_version = get_version(client, name, version)
            if model_version.tags.get(TAG_ROLLED_BACK) and version != (alias and str(alias.version)):
                reference.skipped.append(f"version {version} was rolled back")
                continue
            reference.servable = load_servable(client, name, version)
        except RegistryError as err:
            reference.skipped.append(str(err))
            logger.warning("the gate cannot use %s", err)
            continue
        reference.version = model_version
        return reference
    return reference


def promote(cfg: RegistryConfig, tracking: TrackingConfig, layout: Layout, version: str | None = None, seed: int = 0) -> dict:
    """Gate the challenger (or `version`) against the champion; move `champion` only if it passes."""
    client = registry_client(tracking, layout.root)
    name = cfg.model_name
    from pipeline.core.tracking import directory_sha256

    with promotion_lock(client, name, cfg.lock_timeout_s):
        if version is not None:
            challenger = get_version(client, name, version)
        else:
            challenger = alias_version(client, name, CHALLENGER)
            if challenger is None:
                raise RegistryError(f"{name} has no {CHALLENGER!r} alias: run the register stage first")
        champion = alias_version(client, name, CHAMPION)
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
        result = _gate_and_move(cfg, client, layout, challenger, champion, report, seed)
        describe_version(client, name, str(challenger.version), gate=result)  # the decision in words, best effort
        return result


def _refuse(report: dict, reasons: list[str], layout: Layout, decision: str = "refused") -> dict:
    report.update(decision=decision, promoted=False, reasons=reasons, champion_after=report["champion_version"])
    logger.warning("promotion of %s version %s %s: %s", report["model_name"], report["challenger_version"], decision,
                   "; ".join(reasons))
    write_json(report, layout.reports_dir / PROMOTION_REPORT)
    return report


def _gate_and_move(cfg: RegistryConfig, client: Any, layout: Layout, challenger: Any, champion: Any | None,
                   report: dict, seed: int) -> dict:
    name = cfg.model_name
    if challenger.tags.get(TAG_ROLLED_BACK):
        return _refuse(report, [f"version {challenger.version} was rolled back at {challenger.tags[TAG_ROLLED_BACK]}; "
                                "register a new model to try again"], layout, "rejected")
    try:
        challenger_servable = load_servable(client, name, challenger.version)
    except RegistryError as err:
        return _refuse(report, [f"the challenger cannot be served: {err}"], layout, "rejected")
    reference = reference_champion(client, name, champion, exclude=str(challenger.version))
    report["skipped_champions"] = reference.skipped
    if reference.ever and reference.version is None:
        return _refuse(report, [*reference.skipped, "no earlier champion can be scored, so the challenger cannot be "
                                "gated: roll back to (or re-register) a healthy version, or delete the 'champion' alias "
                                "and the model's leanrec.champion_history tag to start the registry afresh"], layout)
    if reference.version is not None:
        report["reference_version"] = str(reference.version.version)
        comparable, figures, reasons = comparability(reference.servable, layout.features_dir, cfg, seed)
        report["comparability"] = figures
        if not comparable:
            return _refuse(report, [f"version {reference.version.version} (champion) cannot be judged on this run's "
                                    "test split, so the scores are not comparable", *reasons], layout)

    challenger_figures = score_on_split(challenger_servable, layout.features_dir, seed=seed)
    challenger_figures["latency_p50_ms"] = _float_tag(challenger, "latency_p50_ms")
    champion_figures = None
    if reference.version is not None:
        champion_figures = score_on_split(reference.servable, layout.features_dir, seed=seed)
        champion_figures["latency_p50_ms"] = _float_tag(reference.version, "latency_p50_ms")
    promoted, reasons = decide(cfg, challenger_figures, champion_figures)
    reasons = [*reference.skipped, *reasons]
    if promoted and not cfg.allow_promotion:
        promoted = False
        reasons.append("the gate passed, but registry.allow_promotion is false: the champion stays")
    report.update(challenger=challenger_figures, champion=champion_figures, promoted=promoted, reasons=reasons,
                  decision="promoted" if promoted else ("not_allowed" if not cfg.allow_promotion else "rejected"))
    logger.info("promotion of %s version %s: %s (%s)", name, challenger.version, report["decision"], "; ".join(reasons))

    moved = False
    try:
        if promoted:
            # The version check: an alias moved since it was read (by hand, without the lock) is not overwritten.
            now = alias_version(client, name, CHAMPION)
            if (None if now is None else str(now.version)) != report["champion_version"]:
                report.update(decision="superseded", promoted=False, champion_after=None if now is None else str(now.version))
                reasons.append(f"{CHAMPION} moved to version {report['champion_after']} while this gate ran; rerun promote")
                logger.warning("%s moved to version %s while the gate ran", CHAMPION, report["champion_after"])
            else:
                previous = "none" if reference.version is None else str(reference.version.version)
                client.set_model_version_tag(name, challenger.version, TAG_PREVIOUS, previous)
                # The single write that promotes: an overwrite, so `champion` never points nowhere.
                client.set_registered_model_alias(name, CHAMPION, challenger.version)
                moved = True
                record_champion(client, name, str(challenger.version), "promoted")
                report["champion_after"] = str(challenger.version)
        else:
            report["champion_after"] = report["champion_version"]
        figures = {
            TAG_DECISION: report["decision"],
            "leanrec.promotion.at": report["at"],
            "leanrec.promotion.champion_version": report.get("reference_version") or "none",
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
    """Move `champion` back to the version the current champion replaced (or the newest earlier one that exists)."""
    client = registry_client(tracking, layout.root)
    name = cfg.model_name
    with promotion_lock(client, name, cfg.lock_timeout_s):
        champion = alias_version(client, name, CHAMPION)
        if champion is None:
            raise RegistryError(f"{name} has no {CHAMPION!r}: nothing to roll back")
        previous = champion.tags.get(TAG_PREVIOUS, "none")
        if previous in ("", "none"):
            raise RegistryError(f"{name} version {champion.version} was the first champion: there is no previous one to roll back to")
        history = [e["version"] for e in reversed(champion_history(client, name)) if e.get("event") == "promoted"]
        skipped = []
        older = history[history.index(previous) + 1 :] if previous in history else []
        for candidate in dict.fromkeys([previous, *older]):
            if candidate == str(champion.version):
                continue
            try:
                get_version(client, name, candidate)
            except RegistryError as err:
                skipped.append(str(err))
                continue
            break
        else:
            raise RegistryError(f"{name} version {champion.version} replaced version {previous}, and no earlier champion "
                                f"exists any more ({'; '.join(skipped)}): nothing to roll back to")
        client.set_registered_model_alias(name, CHAMPION, candidate)
        at = utc_now()
        client.set_model_version_tag(name, champion.version, TAG_ROLLED_BACK, at)
        record_champion(client, name, candidate, "rolled_back")
        describe_version(client, name, str(champion.version),
                         footer=f"**Rolled back** at {at}: the champion moved back to version {candidate}.")
    logger.info("%s: %s moved back from version %s to %s", name, CHAMPION, champion.version, candidate)
    return {"model_name": name, "rolled_back": str(champion.version), "champion": str(candidate), "at": at,
            "skipped": skipped}
