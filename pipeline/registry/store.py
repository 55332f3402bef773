"""The registry's vocabulary and its MLflow access: aliases, tag keys, report names, the client.

Every package that reads the registry (serving batch jobs, incremental runs, orchestration)
goes through these public functions, never through MLflow's client directly.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.core.config import RegistryConfig, TrackingConfig
from pipeline.core.errors import RegistryError

logger = logging.getLogger(__name__)


COMPRESSION_REPORT = "compression.json"


REGISTRATION_REPORT = "registration.json"
# The compression report's Pareto chart with the registered candidate marked beside the teacher.
REGISTRATION_CHART = "registration.png"


PROMOTION_REPORT = "promotion.json"


CHAMPION = "champion"


CHALLENGER = "challenger"


TAG_CONTENT = "leanrec.content_sha256"


TAG_PREVIOUS = "leanrec.previous_champion"


# The sha256 of the version's artifacts as the store returned them right after registration
# (`artifacts_sha256`): every load from the registry recomputes it, so truncated or flipped bytes are
# refused instead of served.
TAG_ARTIFACTS = "leanrec.artifacts_sha256"


# A registered-model tag (it outlives deleted versions): JSON list of {"version", "at", "event"},
# newest last, one entry per promotion or rollback. The gate falls back on it when the champion's
# version is deleted or corrupt.
TAG_HISTORY = "leanrec.champion_history"
HISTORY_ENTRIES = 60  # a registry tag value is a bounded string: the oldest entries fall off


# Promotions of one model are serialised by a registered model of this name (suffix to the model's):
# creating it is the lock, and the store's unique names make the create atomic, over SQL or REST.
LOCK_SUFFIX = ".promotion-lock"


TAG_ROLLED_BACK = "leanrec.rolled_back_at"


TAG_DECISION = "leanrec.promotion.decision"


# Where the version came from: the work dir (absolute) it was registered from, and its teacher
# (full-precision SASRec) relative to it. Incremental runs fine-tune the champion's teacher on the
# champion's data (pipeline/data/incremental.py: champion_lineage).
TAG_WORKDIR = "leanrec.workdir"


TAG_TEACHER = "leanrec.teacher_path"


FIGURES = ("ndcg@10", "hr@10", "ndcg@10_change", "size_bytes", "parameters", "bytes_per_item",
           "latency_p50_ms", "latency_p95_ms", "throughput_users_s")


# How many decimals a figure is worth in tags and descriptions (the reports keep full floats): quality
# to 4 decimals, milliseconds to microseconds, counts as integers.
FIGURE_FORMATS = {"ndcg@10": ".4f", "hr@10": ".4f", "ndcg@10_change": ".4f", "size_bytes": ".0f", "parameters": ".0f",
                  "bytes_per_item": ".2f", "latency_p50_ms": ".3f", "latency_p95_ms": ".3f", "throughput_users_s": ".1f"}


def figure_text(figure: str, value: float) -> str:
    """A figure as a tag value: rounded to what it is worth, still a number `float()` reads."""
    return format(float(value), FIGURE_FORMATS.get(figure, ".6g"))


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


def get_version(client: Any, name: str, version: str | int) -> Any:
    """A model version; a RegistryError naming the versions that exist when it does not."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise RegistryError(f"{name} version {version}: the registry failed: {err.message}") from None
    existing = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    raise RegistryError(f"{name} has no version {version} (deleted, or never registered); "
                        f"its versions are {existing or 'none'}")


# MLflow rewrites this file per registration (it names the model and version): not the model's content.
REGISTRATION_METADATA = "registered_model_meta"


def artifacts_sha256(directory: Path) -> str:
    """Hash of every file under a downloaded model version (relative paths and contents)."""
    digest = hashlib.sha256()
    files = (p for p in Path(directory).rglob("*") if p.is_file() and p.relative_to(directory).as_posix() != REGISTRATION_METADATA)
    for file in sorted(files):
        digest.update(file.relative_to(directory).as_posix().encode())
        with file.open("rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()


def download_version(name: str, version: str | int, target: Path) -> Path:
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(target)))


def load_servable(client: Any, name: str, version: str | int) -> Any:
    """The registered pyfunc's Servable (model + vocabularies), its artifacts checked against the
    sha256 recorded at registration; a RegistryError when they differ or do not load."""
    import mlflow

    where = f"{name} version {version}"
    expected = get_version(client, name, version).tags.get(TAG_ARTIFACTS)
    staging = Path(tempfile.mkdtemp(prefix="leanrec-registry-"))
    try:
        try:
            local = download_version(name, version, staging)
        except Exception as err:  # noqa: BLE001 - any store failure is reported as the version's
            raise RegistryError(f"{where}: its artifacts cannot be downloaded: {err}") from None
        if expected is None:
            logger.warning("%s has no %s tag (registered before it existed): its files are not verified", where, TAG_ARTIFACTS)
        elif artifacts_sha256(local) != expected:
            raise RegistryError(f"{where} is corrupt: its artifacts' sha256 differs from the {TAG_ARTIFACTS} recorded "
                                "at registration; roll back, or register the model again")
        try:
            return mlflow.pyfunc.load_model(str(local)).unwrap_python_model().servable
        except Exception as err:  # noqa: BLE001 - a model that does not load is reported, not raised as is
            raise RegistryError(f"{where} does not load ({type(err).__name__}: {err})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def champion_version(registry: RegistryConfig, tracking: TrackingConfig, root: Path) -> Any | None:
    """The model version the `champion` alias names, or None when there is none yet."""
    return alias_version(registry_client(tracking, Path(root)), registry.model_name, CHAMPION)


def load_champion(registry: RegistryConfig, tracking: TrackingConfig, root: Path) -> tuple[Any, str]:
    """The champion's Servable (verified) and its version; a RegistryError when there is none or it is corrupt."""
    client = registry_client(tracking, Path(root))
    champion = alias_version(client, registry.model_name, CHAMPION)
    if champion is None:
        deleted = [entry["version"] for entry in champion_history(client, registry.model_name)[-1:]]
        hint = f" (its last champion, version {deleted[0]}, is gone: promote a challenger)" if deleted else ""
        raise RegistryError(f"{registry.model_name} has no {CHAMPION!r}{hint}: run register and promote first")
    return load_servable(client, registry.model_name, champion.version), str(champion.version)


# ----------------------------------------------------------------------------- champion history


def champion_history(client: Any, name: str) -> list[dict[str, str]]:
    """Which version was champion when: [{"version", "at", "event"}], oldest first (empty if none)."""
    from mlflow.exceptions import MlflowException

    try:
        raw = client.get_registered_model(name).tags.get(TAG_HISTORY)
    except MlflowException:
        return []
    try:
        history = json.loads(raw) if raw else []
    except json.JSONDecodeError:
        logger.warning("%s: the %s tag is not JSON; ignoring it", name, TAG_HISTORY)
        return []
    return [entry for entry in history if isinstance(entry, dict) and "version" in entry]


def champion_periods(client: Any, name: str) -> dict[str, Any]:
    """Which version was champion when: the current champion and the history, oldest first, each entry with the
    time the next one replaced it (`until`: None for the current champion)."""
    history = champion_history(client, name)
    periods = [{**entry, "until": later["at"] if later else None}
               for entry, later in zip(history, [*history[1:], None], strict=True)]
    current = alias_version(client, name, CHAMPION)
    return {"model_name": name, "champion": None if current is None else str(current.version), "history": periods}


def record_champion(client: Any, name: str, version: str, event: str) -> None:
    """Append to the champion history (called with the promotion lock held)."""
    history = champion_history(client, name) + [{"version": str(version), "at": utc_now(), "event": event}]
    client.set_registered_model_tag(name, TAG_HISTORY, json.dumps(history[-HISTORY_ENTRIES:]))


# ----------------------------------------------------------------------------- promotion lock


def _lock_holder(client: Any, lock_name: str) -> dict | None:
    from mlflow.exceptions import MlflowException

    try:
        description = client.get_registered_model(lock_name).description or "{}"
    except MlflowException:
        return None  # released meanwhile
    try:
        return json.loads(description.split("\n", 1)[0])
    except json.JSONDecodeError:
        return {}


def _is_stale(holder: dict, timeout_s: float) -> bool:
    """A lock whose process is gone (same host) or older than twice the timeout was left by a crash."""
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
    return time.time() - float(holder.get("since", time.time())) > 2 * timeout_s


@contextmanager
def promotion_lock(client: Any, name: str, timeout_s: float, poll_s: float = 0.2) -> Iterator[None]:
    """Hold the model's promotion lock: a compare-and-set the store enforces (unique model names).

    Waits for a running promotion up to `timeout_s`; a lock left by a crashed process is broken (at
    once on the same host, where its pid shows it; elsewhere when older than twice the timeout).
    """
    from mlflow.exceptions import MlflowException

    lock_name = f"{name}{LOCK_SUFFIX}"
    token = uuid.uuid4().hex
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(), "token": token}
    description = json.dumps(owner) + f"\nLeanRec's promotion lock of {name!r}: delete it only if no promote or rollback is running"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.create_registered_model(lock_name, description=description)
            break
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise RegistryError(f"cannot take the promotion lock {lock_name!r}: {err.message}") from None
        holder = _lock_holder(client, lock_name)
        if holder is not None and _is_stale(holder, timeout_s):
            logger.warning("breaking a stale promotion lock %s held by %s", lock_name, holder)
            _release(client, lock_name, holder.get("token"))
            continue
        if time.monotonic() > deadline:
            raise RegistryError(f"another promotion or rollback of {name} holds the lock {lock_name!r} ({holder}); waited "
                                f"{timeout_s:.0f} s (registry.lock_timeout_s); it counts as stale after {2 * timeout_s:.0f} s. If none is "
                                "running, delete that registered model")
        time.sleep(poll_s)
    try:
        yield
    finally:
        _release(client, lock_name, token)


def _release(client: Any, lock_name: str, token: str | None) -> None:
    from mlflow.exceptions import MlflowException

    holder = _lock_holder(client, lock_name)
    if holder is None or holder.get("token") != token:
        return  # broken and retaken by another process: not ours to delete
    try:
        client.delete_registered_model(lock_name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            logger.warning("could not release the promotion lock %s: %s", lock_name, err.message)
