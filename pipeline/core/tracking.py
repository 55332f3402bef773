"""MLflow tracking: where runs go, and the lineage every run records.

The embedded default is a SQLite store and a local artifact folder inside the
work directory; `MLFLOW_TRACKING_URI` (or `tracking.tracking_uri`) sends runs to
a tracking server instead.

Every run says what started it (`orchestrator_tags`): Airflow (its task's
`AIRFLOW_CTX_*` environment), DVC (the `DVC_STAGE` it sets for stage commands)
or the CLI, and its name says it too (`train-main-airflow-<dag run>`), so runs of
one stage from different orchestrators are told apart. The stages know none of
this: it is read from the environment here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.config import TrackingConfig

logger = logging.getLogger(__name__)


RUN_INFO_FILE = "run.json"  # in models/<run>/: the MLflow run that trained it
# The process that last opened a run: a RUNNING run whose process is gone was killed (fail_orphaned_runs).
PROCESS_TAGS = ("leanrec.process.host", "leanrec.process.pid", "leanrec.process.started")
# MLflow 3's UI opens an experiment without this tag in its GenAI layout (traces, no Models tab);
# `custom_model_development` is its "Machine learning" kind: runs, models, registry.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
TAG_ORCHESTRATOR = "leanrec.orchestrator"  # airflow | dvc | cli
TAG_STAGE_RUN = "leanrec.stage_run"  # the stage's own run name (train-main), whatever the orchestrator adds
# Environment -> tag: what Airflow exports to a task's process, and what DVC sets for a stage's command.
AIRFLOW_ENV_TAGS = {"AIRFLOW_CTX_DAG_ID": "leanrec.dag_id", "AIRFLOW_CTX_DAG_RUN_ID": "leanrec.dag_run_id",
                    "AIRFLOW_CTX_TASK_ID": "leanrec.task_id", "AIRFLOW_CTX_TRY_NUMBER": "leanrec.try_number"}
DVC_ENV_TAGS = {"DVC_STAGE": "leanrec.dvc_stage", "DVC_EXP_NAME": "leanrec.dvc_experiment"}


def write_run_id(run_dir: Path, run_id: str | None) -> None:
    from pipeline.core.io import write_json

    write_json({"mlflow_run_id": run_id}, run_dir / RUN_INFO_FILE)


def read_run_id(run_dir: Path) -> str | None:
    """The MLflow run that trained the model in `run_dir`, if it was tracked."""
    path = run_dir / RUN_INFO_FILE
    return json.loads(path.read_text(encoding="utf-8"))["mlflow_run_id"] if path.exists() else None


def resolve_tracking_uri(cfg: TrackingConfig, root: Path) -> str:
    if cfg.tracking_uri:
        return cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


def orchestrator_tags(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Which orchestrator started this process, from its environment: Airflow's task context, DVC's stage, else the CLI."""
    environ = os.environ if environ is None else environ
    if environ.get("AIRFLOW_CTX_DAG_ID"):
        return {TAG_ORCHESTRATOR: "airflow", **{tag: environ[var] for var, tag in AIRFLOW_ENV_TAGS.items() if environ.get(var)}}
    if environ.get("DVC_STAGE"):
        return {TAG_ORCHESTRATOR: "dvc", **{tag: environ[var] for var, tag in DVC_ENV_TAGS.items() if environ.get(var)}}
    return {TAG_ORCHESTRATOR: "cli"}


def orchestrated_run_name(run_name: str, tags: Mapping[str, str]) -> str:
    """`train-main` as the CLI's, `train-main-dvc`, `train-main-airflow-<dag run id>`."""
    orchestrator = tags.get(TAG_ORCHESTRATOR, "cli")
    if orchestrator == "cli":
        return run_name
    suffix = tags.get("leanrec.dag_run_id") if orchestrator == "airflow" else tags.get("leanrec.dvc_experiment")
    return f"{run_name}-{orchestrator}" + (f"-{suffix}" if suffix else "")


def _experiment_id(mlflow: Any, cfg: TrackingConfig, root: Path) -> str:
    experiment = mlflow.get_experiment_by_name(cfg.experiment)
    if experiment is not None:
        if not experiment.tags.get(EXPERIMENT_KIND_TAG):
            _set_experiment_kind(mlflow, experiment.experiment_id)
        return experiment.experiment_id
    artifact_location = None
    if resolve_tracking_uri(cfg, root).startswith("sqlite:"):
        # Local store: keep artifacts beside the database, inside the work dir.
        artifact_location = (root / "mlartifacts").resolve().as_uri()
    try:
        return mlflow.create_experiment(cfg.experiment, artifact_location=artifact_location,
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except Exception:  # created meanwhile by a concurrent run
        experiment = mlflow.get_experiment_by_name(cfg.experiment)
        if experiment is None:
            raise
        return experiment.experiment_id


def _set_experiment_kind(mlflow: Any, experiment_id: str) -> None:
    """Tag an experiment created before the tag (or by hand) as classic ML; a user who may not edit it only loses the layout."""
    from mlflow.exceptions import MlflowException

    try:
        mlflow.MlflowClient().set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    except MlflowException as err:
        logger.warning("cannot tag experiment %s %s=%s (%s): the MLflow UI may open it in its GenAI layout",
                       experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND, err.message)


@contextlib.contextmanager
def mlflow_run(
    cfg: TrackingConfig, root: Path, run_name: str, run_id: str | None = None, tags: dict | None = None, system_metrics: bool = True
) -> Iterator[Any | None]:
    """An active MLflow run (None when tracking is disabled). `run_id` re-opens an existing run.

    A new run is named `run_name` with its orchestrator's suffix (`orchestrated_run_name`) and tagged with
    the orchestrator, and with `run_name` itself (`leanrec.stage_run`: what `fail_orphaned_runs` looks for).
    """
    if not cfg.enabled:
        yield None
        return
    import mlflow

    mlflow.set_tracking_uri(resolve_tracking_uri(cfg, root))
    experiment_id = _experiment_id(mlflow, cfg, root)
    # A re-opened run (evaluate's, a resumed train's) keeps the origin of the process that started it.
    origin = orchestrator_tags()
    new_run = {} if run_id else {**origin, TAG_STAGE_RUN: run_name}
    with mlflow.start_run(
        run_id=run_id, experiment_id=None if run_id else experiment_id,
        run_name=None if run_id else orchestrated_run_name(run_name, origin),
        tags={**(tags or {}), **new_run, **process_tags()}, log_system_metrics=system_metrics,
    ) as run:
        yield run


def process_tags(pid: int | None = None) -> dict[str, str]:
    """Which process holds a run open: host, pid and the process's start time (a reused pid is another process)."""
    import psutil

    process = psutil.Process(pid or os.getpid())
    return dict(zip(PROCESS_TAGS, (socket.gethostname(), str(process.pid), f"{process.create_time():.3f}"), strict=True))


def process_gone(tags: dict[str, str]) -> bool | None:
    """True when the process recorded in a run's tags is no longer running; None when this host cannot tell."""
    import psutil

    host, pid, started = (tags.get(key) for key in PROCESS_TAGS)
    if host != socket.gethostname() or pid is None or started is None:
        return None  # another machine's process (or a run from before the tags): not ours to judge
    try:
        return f"{psutil.Process(int(pid)).create_time():.3f}" != started
    except psutil.NoSuchProcess:
        return True


def fail_orphaned_runs(cfg: TrackingConfig, root: Path, run_name: str, keep: str | None = None) -> list[str]:
    """End as FAILED the runs named `run_name` still RUNNING whose process is gone (killed: no end_run ran).

    `keep` (the run about to be resumed) is left alone. Runs of other hosts, or without process tags,
    are left too: their process cannot be checked from here. Returns the run ids it ended.
    """
    if not cfg.enabled:
        return []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(resolve_tracking_uri(cfg, root))
    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        return []
    # By the stage's run name tag (every orchestrator's runs), and by name (runs from before the tag).
    running = {run.info.run_id: run for where in (f"tags.`{TAG_STAGE_RUN}` = '{run_name}'", f"attributes.run_name = '{run_name}'")
               for run in client.search_runs([experiment.experiment_id], filter_string=f"attributes.status = 'RUNNING' and {where}")}
    ended = []
    for run in running.values():
        if run.info.run_id != keep and process_gone(run.data.tags):
            client.set_tag(run.info.run_id, "leanrec.ended_by", "its process was gone (killed) when a later run started")
            client.set_terminated(run.info.run_id, "FAILED")
            ended.append(run.info.run_id)
    if ended:
        logger.warning("MLflow: %d run(s) %s left RUNNING by a killed process marked FAILED: %s", len(ended), run_name, ended)
    return ended


def resumable_run_id(cfg: TrackingConfig, root: Path, run_id: str | None) -> str | None:
    """`run_id` if it can be re-opened to record the rest of a resumed run; else None (a new run records it).

    Only a run that did not finish is re-opened (left RUNNING by a killed process, or FAILED): a FINISHED
    run's artifacts may back a registered model version, and continuing it would change them.
    """
    if run_id is None or not cfg.enabled:
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient(resolve_tracking_uri(cfg, root)).get_run(run_id)
    except MlflowException:
        run = None
    if run is None or run.info.lifecycle_stage == "deleted":
        logger.warning("MLflow run %s is not in %s (any more): a new run records the rest", run_id, resolve_tracking_uri(cfg, root))
        return None
    if run.info.status == "FINISHED":
        logger.info("MLflow run %s finished: a new run records the resumed epochs", run_id)
        return None
    return run_id


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def param_value(value: Any) -> str:
    """A value as an MLflow param: floats to 6 significant digits (nine decimals of noise help nobody reading
    the runs table), anything else as its text; MLflow keeps 500 characters."""
    text = format(value, ".6g") if isinstance(value, float) else str(value)
    return text[:500]


def git_commit(cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def dvc_locked_hash(root: Path, out_path: str) -> str | None:
    """The hash dvc.lock records for an output (e.g. data/features), if this root is a DVC workspace."""
    lock = root / "dvc.lock"
    if not lock.exists():
        return None
    stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {})
    for stage in stages.values():
        for out in stage.get("outs", []):
            if out.get("path") == out_path:
                return out.get("md5")
    return None


def directory_sha256(path: Path) -> str:
    """Content hash of every file below `path` (names and bytes), independent of DVC."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def lineage_tags(root: Path, features_dir: Path) -> dict[str, str]:
    tags = {"leanrec.features.sha256": directory_sha256(features_dir)}
    commit = git_commit(root) or git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    locked = dvc_locked_hash(root, "data/features")
    if locked:
        tags["leanrec.features.dvc_md5"] = locked
    return tags


def parquet_schema(path: Path) -> Any:
    """The MLflow schema of a Parquet file, read from its footer (no rows are loaded)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from mlflow.types.schema import Array, ColSpec, DataType, Schema

    def mlflow_type(arrow: Any) -> Any:
        if pa.types.is_list(arrow) or pa.types.is_large_list(arrow):
            return Array(mlflow_type(arrow.value_type))
        checks = ((pa.types.is_boolean, DataType.boolean), (lambda t: t in (pa.int8(), pa.int16(), pa.int32()), DataType.integer),
                  (pa.types.is_integer, DataType.long), (lambda t: t == pa.float32(), DataType.float),
                  (pa.types.is_floating, DataType.double), (pa.types.is_timestamp, DataType.datetime),
                  (lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t), DataType.binary))
        return next((kind for check, kind in checks if check(arrow)), DataType.string)  # strings, dictionaries, the rest

    return Schema([ColSpec(mlflow_type(field.type), field.name) for field in pq.read_schema(path)])


# A split of the features file, as MLflow names the use of an input.
SPLIT_CONTEXTS = {"train": "training", "valid": "validation", "test": "test"}


def log_split_input(path: Path, split: str) -> None:
    """Log one split of a Parquet features file as an input of the active run, by reference: source path,
    schema and row count from its footer, digest = the file's sha256 (MLflow keeps 36 characters of it).

    Each split is its own dataset (`sequences.train`, ...): MLflow records a dataset once per run."""
    import warnings

    import pyarrow.parquet as pq
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    import mlflow

    path = Path(path).resolve()
    with path.open("rb") as handle:
        sha256 = hashlib.file_digest(handle, "sha256").hexdigest()
    with warnings.catch_warnings():  # MLflow registers the local store under two schemes and warns it picks one
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        source = resolve_dataset_source(str(path))
    dataset = MetaDataset(source, name=f"{path.stem}.{split}", digest=sha256[:36],
                          schema=parquet_schema(path))
    mlflow.log_input(dataset, context=SPLIT_CONTEXTS[split],
                     tags={"leanrec.split": split, "leanrec.rows": str(pq.ParquetFile(path).metadata.num_rows),
                           "leanrec.sha256": sha256})
