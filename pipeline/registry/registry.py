"""MLflow model registry: register the policy's candidate, gate its promotion, roll back.

- `register`: among the teacher and its variants in reports/compression.json, the
  candidate is the best by `registry.policy.metric` within the latency and size
  budgets; it is logged as the servable pyfunc (pipeline/serving/pyfunc.py), registered
  as a new version of `registry.model_name` with its figures and lineage as tags,
  and aliased `challenger`. A version whose files (model + features) have the
  same content hash is reused instead of duplicated, so re-running is safe.
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

import datetime as dt
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from pipeline.core.config import RegistryConfig, TrackingConfig
from pipeline.core.errors import PipelineError
from pipeline.core.io import Layout, write_json

logger = logging.getLogger(__name__)

COMPRESSION_REPORT = "compression.json"
REGISTRATION_REPORT = "registration.json"
PROMOTION_REPORT = "promotion.json"
CHAMPION = "champion"
CHALLENGER = "challenger"
TAG_CONTENT = "leanrec.content_sha256"
TAG_PREVIOUS = "leanrec.previous_champion"
TAG_ROLLED_BACK = "leanrec.rolled_back_at"
TAG_DECISION = "leanrec.promotion.decision"
# Where the version came from: the work dir (absolute) it was registered from, and its teacher
# (full-precision SASRec) relative to it. Incremental runs fine-tune the champion's teacher on the
# champion's data (pipeline/data/incremental.py: champion_lineage).
TAG_WORKDIR = "leanrec.workdir"
TAG_TEACHER = "leanrec.teacher_path"
FIGURES = ("ndcg@10", "hr@10", "ndcg@10_change", "size_bytes", "parameters", "bytes_per_item",
           "latency_p50_ms", "latency_p95_ms", "throughput_users_s")


class RegistryError(PipelineError):
    """Nothing to register or promote, no candidate within budget, no champion to roll back to..."""


def tag_key(figure: str) -> str:
    """MLflow tag keys cannot hold '@': ndcg@10 -> leanrec.metric.ndcg_at_10."""
    return f"leanrec.metric.{figure.replace('@', '_at_')}"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _client(tracking: TrackingConfig, root: Path) -> Any:
    if not tracking.enabled:
        raise RegistryError("the model registry lives in MLflow: set tracking.enabled=true")
    import mlflow
    from mlflow import MlflowClient

    from pipeline.core.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking, root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _alias_version(client: Any, name: str, alias: str) -> Any | None:
    """The version an alias points at, or None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


# ----------------------------------------------------------------------------- candidate


def read_compression(layout: Layout) -> dict:
    path = layout.reports_dir / COMPRESSION_REPORT
    if not path.exists():
        raise RegistryError(f"{path} not found: run the compress and evaluate stages first")
    report = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(report.get("models"), dict) or not report["models"]:
        raise RegistryError(f"{path} lists no models")
    return report


def select_candidate(report: dict, policy: Any) -> tuple[str, dict[str, str]]:
    """The policy's pick and, for every model, why it was or was not eligible."""
    models = report["models"]
    unknown = [name for name in policy.candidates if name not in models]
    if unknown:
        raise RegistryError(f"registry.policy.candidates {unknown} are not in {COMPRESSION_REPORT} (it has {sorted(models)})")
    names = policy.candidates or list(models)
    reasons: dict[str, str] = {}
    eligible = []
    for name in names:
        entry = models[name]
        latency, size, score = entry.get("latency_p50_ms"), entry.get("size_bytes"), entry.get(policy.metric)
        if score is None:
            reasons[name] = f"no {policy.metric}"
        elif policy.max_latency_p50_ms is not None and (latency is None or latency > policy.max_latency_p50_ms):
            reasons[name] = f"latency_p50_ms {latency} over the budget {policy.max_latency_p50_ms}"
        elif policy.max_size_bytes is not None and (size is None or size > policy.max_size_bytes):
            reasons[name] = f"size_bytes {size} over the budget {policy.max_size_bytes}"
        else:
            reasons[name] = "eligible"
            eligible.append(name)
    if not eligible:
        raise RegistryError("no model meets the registry policy: " + "; ".join(f"{n}: {r}" for n, r in reasons.items()))
    # Best metric; ties go to the smaller model, then to the name (deterministic).
    best = max(eligible, key=lambda n: (models[n][policy.metric], -(models[n].get("size_bytes") or 0), n))
    reasons[best] = "selected"
    return best, reasons


def content_sha256(model_dir: Path, features_sha: str) -> str:
    """Hash of the model's own files and of the features it is served with."""
    from pipeline.serving.pyfunc import model_files

    digest = hashlib.sha256()
    for file in model_files(model_dir):
        digest.update(file.name.encode())
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    digest.update(features_sha.encode())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- register


def _ensure_registered_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        try:
            client.create_registered_model(name, description="LeanRec SASRec recommender (teacher or compressed variant)")
        except MlflowException as create_err:  # created meanwhile by a concurrent register
            if create_err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise


def register(cfg: RegistryConfig, tracking: TrackingConfig, layout: Layout) -> dict:
    """Register the policy's candidate (or reuse its identical version) and alias it `challenger`."""
    from pipeline.core.tracking import directory_sha256, git_commit, mlflow_run, read_run_id

    report = read_compression(layout)
    candidate, reasons = select_candidate(report, cfg.policy)
    entry = report["models"][candidate]
    model_dir = layout.root / entry["path"]
    if not model_dir.is_dir():
        raise RegistryError(f"{candidate}: {model_dir} does not exist (compression.json paths are relative to the work dir)")
    if not (layout.features_dir / "sequences.parquet").exists():
        raise RegistryError(f"{layout.features_dir} has no features: run the features stage first")
    features_sha = directory_sha256(layout.features_dir)
    content = content_sha256(model_dir, features_sha)
    client = _client(tracking, layout.root)
    _ensure_registered_model(client, cfg.model_name)

    existing = [v for v in client.search_model_versions(f"name='{cfg.model_name}'") if v.tags.get(TAG_CONTENT) == content]
    if existing:
        version = min(existing, key=lambda v: int(v.version))
        created = False
        logger.info("%s: identical files already registered as version %s; reusing it", candidate, version.version)
    else:
        teacher_path = report["models"].get(report.get("teacher", "teacher"), {}).get("path", entry["path"])
        teacher_dir = layout.root / teacher_path
        parent = entry.get("mlflow_run_id") or read_run_id(teacher_dir) or ""
        tags = {
            TAG_CONTENT: content,
            "leanrec.variant": candidate,
            "leanrec.kind": str(entry.get("kind", "")),
            "leanrec.path": entry["path"],
            "leanrec.parent_run_id": parent,
            "leanrec.features.sha256": features_sha,
            TAG_WORKDIR: str(layout.root.resolve()),
            TAG_TEACHER: str(teacher_path),
            "leanrec.git_commit": git_commit(layout.root) or git_commit() or "",
            "leanrec.split": str(report.get("split", "")),
            "leanrec.device": str(report.get("device", "")),
            **{tag_key(f): str(entry[f]) for f in FIGURES if entry.get(f) is not None},
        }
        import mlflow

        from pipeline.serving.pyfunc import log_servable

        with mlflow_run(tracking, layout.root, f"register-{candidate}", tags={k: v for k, v in tags.items() if v},
                        system_metrics=False):
            mlflow.log_dict(report, f"reports/{COMPRESSION_REPORT}")
            mlflow.log_metrics({tag_key(f).removeprefix("leanrec.metric."): float(entry[f])
                                for f in FIGURES if isinstance(entry.get(f), int | float)})
            info = log_servable(model_dir, layout.features_dir)
            version = mlflow.register_model(info.model_uri, cfg.model_name, tags={k: v for k, v in tags.items() if v})
        created = True
        logger.info("registered %s as %s version %s", candidate, cfg.model_name, version.version)
    client.set_registered_model_alias(cfg.model_name, CHALLENGER, version.version)
    result = {
        "model_name": cfg.model_name, "version": str(version.version), "alias": CHALLENGER, "candidate": candidate,
        "kind": entry.get("kind"), "path": entry["path"], "created": created, "content_sha256": content,
        "figures": {f: entry.get(f) for f in FIGURES}, "policy": cfg.policy.model_dump(mode="json"), "considered": reasons,
    }
    write_json(result, layout.reports_dir / REGISTRATION_REPORT)
    return result


# ----------------------------------------------------------------------------- promote


def load_servable(name: str, version: str) -> Any:
    """The registered pyfunc's Servable (model + vocabularies), loaded through MLflow."""
    import mlflow

    return mlflow.pyfunc.load_model(f"models:/{name}/{version}").unwrap_python_model().servable


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

    from pipeline.evaluation.evaluate import evaluate
    from pipeline.data.features import ITEM_VOCAB_FILE
    from pipeline.data.sequences import load_sequences

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
    client = _client(tracking, layout.root)
    name = cfg.model_name
    if version is not None:
        challenger = client.get_model_version(name, str(version))
    else:
        challenger = _alias_version(client, name, CHALLENGER)
        if challenger is None:
            raise RegistryError(f"{name} has no {CHALLENGER!r} alias: run the register stage first")
    champion = _alias_version(client, name, CHAMPION)
    from pipeline.core.tracking import directory_sha256

    report: dict[str, Any] = {
        "model_name": name, "challenger_version": str(challenger.version),
        "champion_version": None if champion is None else str(champion.version),
        "split": "test", "features_sha256": directory_sha256(layout.features_dir), "at": _now(),
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
            after = _alias_version(client, name, CHAMPION)
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


# ----------------------------------------------------------------------------- rollback


def rollback(cfg: RegistryConfig, tracking: TrackingConfig, layout: Layout) -> dict:
    """Move `champion` back to the version the current champion replaced."""
    client = _client(tracking, layout.root)
    name = cfg.model_name
    champion = _alias_version(client, name, CHAMPION)
    if champion is None:
        raise RegistryError(f"{name} has no {CHAMPION!r}: nothing to roll back")
    previous = champion.tags.get(TAG_PREVIOUS, "none")
    if previous in ("", "none"):
        raise RegistryError(f"{name} version {champion.version} was the first champion: there is no previous one to roll back to")
    client.get_model_version(name, previous)  # fails clearly if that version is gone
    client.set_registered_model_alias(name, CHAMPION, previous)
    at = _now()
    client.set_model_version_tag(name, champion.version, TAG_ROLLED_BACK, at)
    logger.info("%s: %s moved back from version %s to %s", name, CHAMPION, champion.version, previous)
    return {"model_name": name, "rolled_back": str(champion.version), "champion": str(previous), "at": at}
