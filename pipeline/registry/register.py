"""MLflow model registry: register the policy's candidate, gate its promotion, roll back.

- `register`: among the teacher and its variants in reports/compression.json, the
  candidate is picked by `registry.policy.metric` within the latency and size
  budgets and at least `registry.policy.min_latency_speedup` times as fast as the
  teacher (so a "compressed" pick is never slower than what it compresses); the
  models within `registry.policy.tolerance` of the best metric count as equal and
  the fastest of them wins (then the smallest), so noise never decides; it is
  logged as the servable pyfunc (pipeline/serving/pyfunc.py), registered as a new
  version of `registry.model_name` with its figures and lineage as tags and,
  in words, as its description (pipeline/registry/describe.py), and aliased
  `challenger`. A version whose files (model + features) have the same
  content hash is reused instead of duplicated, so re-running is safe.
  reports/registration.png is the compression report's Pareto chart with the
  candidate marked beside the teacher (the evaluate stage's chart, drawn before
  the choice, marks the teacher only); a new version's register run holds it too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pipeline.core.config import RegistryConfig, TrackingConfig
from pipeline.core.errors import RegistryError
from pipeline.core.io import Layout, write_json
from pipeline.evaluation.pareto import pareto_chart
from pipeline.registry.describe import describe_model, describe_version, model_description
from pipeline.registry.store import (
    CHALLENGER,
    COMPRESSION_REPORT,
    FIGURES,
    REGISTRATION_CHART,
    REGISTRATION_REPORT,
    TAG_ARTIFACTS,
    TAG_CONTENT,
    TAG_TEACHER,
    TAG_WORKDIR,
    artifacts_sha256,
    figure_text,
    registry_client,
    tag_key,
)

logger = logging.getLogger(__name__)


def read_compression(layout: Layout) -> dict:
    path = layout.reports_dir / COMPRESSION_REPORT
    if not path.exists():
        raise RegistryError(f"{path} not found: run the compress and evaluate stages first")
    report = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(report.get("models"), dict) or not report["models"]:
        raise RegistryError(f"{path} lists no models")
    if report.get("missing_variants"):
        logger.warning("%s was written without compress.variants %s (not built when evaluate ran): the candidates are "
                       "%s; run `python -m pipeline compress` and `python -m pipeline evaluate` to consider them",
                       path, report["missing_variants"], sorted(report["models"]))
    return report


def select_candidate(report: dict, policy: Any) -> tuple[str, dict[str, str]]:
    """The policy's pick and, for every model, why it was or was not eligible."""
    models = report["models"]
    unknown = [name for name in policy.candidates if name not in models]
    if unknown:
        raise RegistryError(f"registry.policy.candidates {unknown} are not in {COMPRESSION_REPORT} (it has {sorted(models)})")
    names = policy.candidates or list(models)
    # Speed-ups are taken against the teacher measured in the same report (same run, same machine).
    teacher_latency = models.get(report.get("teacher", "teacher"), {}).get("latency_p50_ms")
    reasons: dict[str, str] = {}
    eligible = []
    for name in names:
        entry = models[name]
        latency, size, score = entry.get("latency_p50_ms"), entry.get("size_bytes"), entry.get(policy.metric)
        speedup = teacher_latency / latency if teacher_latency and latency else None
        if score is None:
            reasons[name] = f"no {policy.metric}"
        elif policy.min_latency_speedup is not None and (speedup is None or speedup < policy.min_latency_speedup):
            reasons[name] = ("no latency measured beside the teacher's" if speedup is None else
                             f"latency speed-up {speedup:.2f}x over the teacher is under the minimum {policy.min_latency_speedup}x")
        elif policy.max_latency_p50_ms is not None and (latency is None or latency > policy.max_latency_p50_ms):
            reasons[name] = f"latency_p50_ms {latency} over the budget {policy.max_latency_p50_ms}"
        elif policy.max_size_bytes is not None and (size is None or size > policy.max_size_bytes):
            reasons[name] = f"size_bytes {size} over the budget {policy.max_size_bytes}"
        else:
            reasons[name] = "eligible"
            eligible.append(name)
    if not eligible:
        raise RegistryError("no model meets the registry policy: " + "; ".join(f"{n}: {r}" for n, r in reasons.items()))
    # Quality within the tolerance of the best is a tie (the figures are noisy): the cheaper model to serve
    # wins, by batch-1 latency, then size, then quality, then name (deterministic).
    top = max(models[n][policy.metric] for n in eligible)
    equal = [n for n in eligible if models[n][policy.metric] >= top * (1.0 - policy.tolerance)]
    inf = float("inf")
    best = min(equal, key=lambda n: (models[n].get("latency_p50_ms") or inf, models[n].get("size_bytes") or inf,
                                     -models[n][policy.metric], n))
    for name in equal:
        reasons[name] = f"within {policy.tolerance:.1%} of the best {policy.metric}, but slower or larger than {best}"
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


def stored_sha256(model_uri: str) -> str:
    """`artifacts_sha256` of a logged model, downloaded back from the artifact store."""
    import mlflow

    staging = tempfile.mkdtemp(prefix="leanrec-register-")
    try:
        return artifacts_sha256(Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=staging)))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _ensure_registered_model(client: Any, name: str) -> None:
    """The registered model, created with its description (or given it, when it has none yet)."""
    from mlflow.exceptions import MlflowException

    try:
        describe_model(client, name, client.get_registered_model(name).description)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        try:
            client.create_registered_model(name, description=model_description(name))
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
    chart = pareto_chart(report, layout.reports_dir / REGISTRATION_CHART, marked=candidate,
                         marked_label=f"registered candidate, alias {CHALLENGER}")
    client = registry_client(tracking, layout.root)
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
            **{tag_key(f): figure_text(f, entry[f]) for f in FIGURES if isinstance(entry.get(f), int | float)},
        }
        import mlflow
        from pipeline.serving.pyfunc import log_servable

        with mlflow_run(tracking, layout.root, f"register-{candidate}", tags={k: v for k, v in tags.items() if v},
                        system_metrics=False):
            mlflow.log_dict(report, f"reports/{COMPRESSION_REPORT}")
            mlflow.log_artifact(str(chart), "reports")
            mlflow.log_metrics({tag_key(f).removeprefix("leanrec.metric."): float(entry[f])
                                for f in FIGURES if isinstance(entry.get(f), int | float)})
            info = log_servable(model_dir, layout.features_dir)
            # Hashed as the store returns it, before registering, so the version never exists without its hash.
            tags[TAG_ARTIFACTS] = stored_sha256(info.model_uri)
            version = mlflow.register_model(info.model_uri, cfg.model_name, tags={k: v for k, v in tags.items() if v})
        created = True
        logger.info("registered %s as %s version %s", candidate, cfg.model_name, version.version)
    if created or not version.description:  # a version registered before descriptions gets one too
        describe_version(client, cfg.model_name, str(version.version))
    client.set_registered_model_alias(cfg.model_name, CHALLENGER, version.version)
    result = {
        "model_name": cfg.model_name, "version": str(version.version), "alias": CHALLENGER, "candidate": candidate,
        "kind": entry.get("kind"), "path": entry["path"], "created": created, "content_sha256": content,
        "figures": {f: entry.get(f) for f in FIGURES}, "policy": cfg.policy.model_dump(mode="json"), "considered": reasons,
    }
    write_json(result, layout.reports_dir / REGISTRATION_REPORT)
    return result
