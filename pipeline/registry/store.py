"""The registry's vocabulary and its MLflow access: aliases, tag keys, report names, the client.

Every package that reads the registry (serving batch jobs, incremental runs, orchestration)
goes through these public functions, never through MLflow's client directly.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

from pipeline.core.config import RegistryConfig, TrackingConfig
from pipeline.core.errors import RegistryError

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


def tag_key(figure: str) -> str:
    """MLflow tag keys cannot hold '@': ndcg@10 -> leanrec.metric.ndcg_at_10."""
    return f"leanrec.metric.{figure.replace('@', '_at_')}"


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def registry_client(tracking: TrackingConfig, root: Path) -> Any:
    if not tracking.enabled:
        raise RegistryError("the model registry lives in MLflow: set tracking.enabled=true")
    import mlflow
    from mlflow import MlflowClient
    from pipeline.core.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking, root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def alias_version(client: Any, name: str, alias: str) -> Any | None:
    """The version an alias points at, or None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def load_servable(name: str, version: str) -> Any:
    """The registered pyfunc's Servable (model + vocabularies), loaded through MLflow."""
    import mlflow

    return mlflow.pyfunc.load_model(f"models:/{name}/{version}").unwrap_python_model().servable


def champion_version(registry: RegistryConfig, tracking: TrackingConfig, root: Path) -> Any | None:
    """The model version the `champion` alias names, or None when there is none yet."""
    return alias_version(registry_client(tracking, Path(root)), registry.model_name, CHAMPION)


def load_champion(registry: RegistryConfig, tracking: TrackingConfig, root: Path) -> tuple[Any, str]:
    """The champion's Servable and its version; a RegistryError when there is no champion."""
    champion = champion_version(registry, tracking, root)
    if champion is None:
        raise RegistryError(f"{registry.model_name} has no {CHAMPION!r}: run register and promote first")
    return load_servable(registry.model_name, str(champion.version)), str(champion.version)
