"""Per-run work directories for orchestrators (Airflow): params.yaml + form values -> one run root.

Airflow-free: what is Airflow's (default_args, pools, the form's Params, the task group the DAGs
share, the task wrapper of `run_stage`) is in `pipeline.orchestration.airflow`.

An Airflow DAG run never works in the project root (DVC's workspace): it gets its
own root, `$LEANREC_RUNS_DIR/<run key>`, holding `params.yaml` (the effective
configuration of the run, written once by `prepare_run`), `dag_run.json` (what was
asked for) and the usual `data/`, `models/`, `reports/` of a `Layout`. Every task
of the run reads that `params.yaml`, so a change to the project's params.yaml
while a run is in flight does not change the run, and a retried or cleared task
reruns the same stage on the same inputs.

The DAG form's fields become `-S`-style overrides of the project's params.yaml
(`overrides_from_form`): the form adds no second configuration. The stages run
through the CLI's own wiring (`pipeline.orchestration.cli.STAGES`), so Airflow, DVC and
`python -m pipeline` call the same functions with the same arguments.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import typing
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.config import Params, VariantName, load_params, params_from_dict, parse_override
from pipeline.core.errors import ConfigError, ValidationFailed
from pipeline.core.io import Layout, atomic_path, is_uri, write_json

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
RUN_PARAMS_FILE = "params.yaml"  # the effective configuration of one run
RUN_INFO_FILE = "dag_run.json"  # the DAG run id, the form values and the overrides built from them

# Form field -> params key. `data_path` maps to the path key of the chosen source (see below).
FORM_KEYS: dict[str, str] = {
    "source": "ingest.source",
    "synthetic_interactions": "ingest.synthetic.n_interactions",
    "synthetic_items": "ingest.synthetic.n_items",
    "data_engine": "data_engine",
    "model": "train.model",
    "preset": "train.preset",
    "epochs": "train.epochs",
    "compression_variants": "compress.variants",
    "promotion_metric": "registry.policy.metric",
    "promotion_tolerance": "registry.ndcg_tolerance",
    "latency_budget_ms": "registry.policy.max_latency_p50_ms",
    "allow_promotion": "registry.allow_promotion",
    "recommendations_per_user": "recommend.k",
}
SOURCE_PATH_KEYS = {"movielens": "ingest.movielens.path", "file": "ingest.file.path"}
# The variants the compress stage builds (the params schema's own list: no torch import at DAG parse).
COMPRESSION_VARIANTS = typing.get_args(VariantName)
# Keys holding paths: relative values are relative to the project root (where the CLI and DVC
# run), so they are made absolute before a run works in its own directory.
PATH_KEYS = ("ingest.movielens.path", "ingest.file.path", "features.vocab_from", "train.init_from", "drift.reference")

# The keys a DAG run's free `overrides` field may set: what a person triggering a run should tune
# (data generation, thresholds, training, compression, evaluation, the promotion policy), never
# where the run reads or writes (paths, the model directory name, the tracking server or experiment,
# the registered model, a download URL). A key is allowed when it is one of these prefixes or under
# one (`train` allows `train.lr`, `train.bpr.epochs`), unless it is, holds or lies under one of
# FORM_OVERRIDE_REFUSED. Only the form is limited: the CLI's -S and DVC take any key.
FORM_OVERRIDE_PREFIXES = (
    "seed",
    "ingest.synthetic",
    "ingest.movielens.variant",
    "ingest.file.format", "ingest.file.sep", "ingest.file.header", "ingest.file.columns", "ingest.file.id_type",
    "ingest.file.timestamp_unit", "ingest.file.event_weights",
    "validate",
    "features.min_rating", "features.dedupe", "features.min_user_interactions", "features.min_item_interactions",
    "features.max_kcore_iterations", "features.split",
    "train",
    "evaluate",
    "compress",
    "drift",
    "registry.policy", "registry.ndcg_tolerance", "registry.allow_promotion",
    "recommend.k", "recommend.batch_size", "recommend.device", "recommend.histories",
    "tracking.enabled",
)
FORM_OVERRIDE_REFUSED = (*PATH_KEYS, "train.run_name")


def project_root() -> Path:
    return Path(os.environ.get("LEANREC_PROJECT_DIR") or PROJECT_ROOT).resolve()


def params_path() -> Path:
    """The project's params.yaml ($LEANREC_PARAMS overrides it)."""
    return Path(os.environ.get("LEANREC_PARAMS") or project_root() / "params.yaml")


def runs_dir() -> Path:
    """Where run roots live: $LEANREC_RUNS_DIR, else <AIRFLOW_HOME or project/.airflow>/leanrec_runs."""
    if os.environ.get("LEANREC_RUNS_DIR"):
        return Path(os.environ["LEANREC_RUNS_DIR"]).resolve()
    home = os.environ.get("AIRFLOW_HOME") or project_root() / ".airflow"
    return (Path(home) / "leanrec_runs").resolve()


def choices(dotted_key: str) -> list[Any]:
    """The allowed values of a Literal-typed params key (e.g. `train.preset`), for form enums."""
    model: Any = Params
    *sections, leaf = dotted_key.split(".")
    for part in sections:
        model = model.model_fields[part if part != "validate" else "validate_"].annotation
    values = typing.get_args(model.model_fields[leaf].annotation)
    if not values:
        raise ConfigError(f"{dotted_key} is not a Literal-typed key")
    return list(values)


def run_key(run_id: str) -> str:
    """A directory name for a run id: its safe characters plus a hash of the whole id (no collisions)."""
    if not run_id:
        raise ConfigError("a run needs a non-empty run id")
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", run_id).strip("._")[:80] or "run"
    return f"{safe}-{hashlib.sha256(run_id.encode()).hexdigest()[:8]}"


def _yaml_value(value: Any) -> str:
    # JSON is valid YAML, and parse_override reads the value back as YAML: strings stay strings.
    return json.dumps(value)


def overrides_from_form(form: dict[str, Any]) -> list[str]:
    """`key=value` overrides for the form values that are set (None means: keep params.yaml)."""
    known = {*FORM_KEYS, "data_path", "overrides"}
    unknown = set(form) - known
    if unknown:
        raise ConfigError(f"unknown form fields: {sorted(unknown)} (known: {sorted(known)})")
    overrides = [f"{key}={_yaml_value(form[name])}" for name, key in FORM_KEYS.items() if form.get(name) is not None]
    if form.get("data_path"):
        source = form.get("source")
        if source is None:
            raise ConfigError("data_path needs a source (movielens or file)")
        if source not in SOURCE_PATH_KEYS:
            raise ConfigError(f"data_path is set but source {source!r} reads no path (use movielens or file)")
        overrides.append(f"{SOURCE_PATH_KEYS[source]}={_yaml_value(str(form['data_path']))}")
    extra = form.get("overrides") or []
    if not isinstance(extra, list) or not all(isinstance(item, str) for item in extra):
        raise ConfigError(f"overrides must be a list of 'key=value' strings, got {extra!r}")
    extra = [item.strip() for item in extra if item.strip()]
    for item in extra:
        check_form_override(parse_override(item)[0])
    return overrides + extra


def form_override_allowed(key: str) -> bool:
    """Whether the form's free `overrides` may set `key` (FORM_OVERRIDE_PREFIXES, less FORM_OVERRIDE_REFUSED)."""
    def under(inner: str, outer: str) -> bool:
        return inner == outer or inner.startswith(outer + ".")

    if not any(under(key, prefix) for prefix in FORM_OVERRIDE_PREFIXES):
        return False
    # `train.init_from` itself, what lies under it, and `train={...}`, which would set it too.
    return not any(under(key, refused) or under(refused, key) for refused in FORM_OVERRIDE_REFUSED)


def check_form_override(key: str) -> None:
    """A ConfigError naming `key` and the allowed keys unless the form's `overrides` may set it."""
    if not form_override_allowed(key):
        raise ConfigError(
            f"override {key!r} is not allowed from the Airflow form. Allowed: {', '.join(FORM_OVERRIDE_PREFIXES)} "
            f"and the keys under them, except {', '.join(FORM_OVERRIDE_REFUSED)}. Any key can be set with the "
            "CLI's -S (python -m pipeline ... -S key=value) or in params.yaml.")


def _absolute_paths(tree: dict[str, Any], base: Path) -> dict[str, Any]:
    for dotted in PATH_KEYS:
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        if node.get(leaf) and not Path(node[leaf]).is_absolute() and not is_uri(node[leaf]):  # s3://... stays
            node[leaf] = str((base / node[leaf]).resolve())
    return tree


def effective_params(form: dict[str, Any], base_params: Path | None = None,
                     base_overrides: list[str] | None = None) -> tuple[Params, list[str]]:
    """params.yaml + `base_overrides` + the form's overrides, with project-relative paths made absolute."""
    base_params = base_params or params_path()
    overrides = [*(base_overrides or []), *overrides_from_form(form)]
    params = load_params(base_params, overrides)
    tree = _absolute_paths(params.model_dump(mode="json", by_alias=True), project_root())
    return params_from_dict(tree, source=f"{base_params} + {overrides}"), overrides


def prepare_run(run_id: str, form: dict[str, Any], base_params: Path | None = None,
                base_overrides: list[str] | None = None) -> Path:
    """Create (or reuse) the run root of `run_id` and write its effective params.yaml; return the root.

    `base_overrides` (e.g. an incremental run's champion lineage) apply before the form's.
    Idempotent: a rerun with the same form rewrites the same files; data already produced
    by the run's stages is left in place for them to overwrite.
    """
    params, overrides = effective_params(form, base_params, base_overrides)
    root = runs_dir() / run_key(run_id)
    root.mkdir(parents=True, exist_ok=True)
    with atomic_path(root / RUN_PARAMS_FILE) as tmp:
        tmp.write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True), sort_keys=False), encoding="utf-8")
    write_json({"run_id": run_id, "form": form, "overrides": overrides,
                "base_params": str(base_params or params_path())}, root / RUN_INFO_FILE)
    _link_local_tracking_store(params, root)
    logger.info("run %s works in %s (overrides: %s)", run_id, root, overrides or "none")
    return root


def prepare_incremental_run(run_id: str, form: dict[str, Any], base_params: Path | None = None) -> Path:
    """A run root that fine-tunes the current champion on its data plus the new interactions.

    The run's params get the champion's lineage (`pipeline.registry.lineage.champion_lineage`) before
    the form: drift.reference (the champion's training interactions, also what select-new and
    merge compare with), features.vocab_from, train.init_from and the champion's model shape. The
    lineage is recorded in the run root once, so a retried prepare keeps the champion it started
    from even if `champion` moved meanwhile. No champion: a RegistryError (run leanrec_train first).
    """
    from pipeline.core.errors import RegistryError
    from pipeline.registry.lineage import LINEAGE_FILE, ChampionLineage, champion_lineage

    root = prepare_run(run_id, form, base_params)
    recorded = root / LINEAGE_FILE
    if recorded.exists():
        lineage = ChampionLineage(**json.loads(recorded.read_text(encoding="utf-8")))
    else:
        params = run_params(root)
        lineage = champion_lineage(params.registry, params.tracking, root)
        if lineage is None:
            raise RegistryError(f"{params.registry.model_name} has no champion: an incremental run fine-tunes the "
                                "champion, so train one first (DAG leanrec_train, or the register and promote stages)")
        write_json(lineage.to_dict(), recorded)
    logger.info("incremental run %s starts from %s version %s (%s)", run_id, lineage.model_name, lineage.version,
                lineage.workdir)
    return prepare_run(run_id, form, base_params, base_overrides=lineage.overrides())


def champion_version(root: str | Path) -> str | None:
    """The version the run's registry calls `champion`, or None (no champion yet)."""
    from pipeline.registry.store import champion_version as registry_champion

    params = run_params(Path(root))
    champion = registry_champion(params.registry, params.tracking, Path(root))
    return None if champion is None else str(champion.version)


def _link_local_tracking_store(params: Params, root: Path) -> None:
    """With no tracking server configured, runs log to the project's own store (mlflow.db, mlartifacts/).

    The tracking code puts a local store inside the work dir; two links there send every run,
    and the CLI, to one store, so the registry sees every run's model.
    """
    if not params.tracking.enabled or params.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return
    for name in ("mlflow.db", "mlartifacts"):
        link, target = root / name, project_root() / name
        if link.is_symlink() or link.exists():
            continue
        link.symlink_to(target, target_is_directory=name == "mlartifacts")


def run_params(root: Path) -> Params:
    path = Path(root) / RUN_PARAMS_FILE
    if not path.exists():
        raise ConfigError(f"{path} not found: the run's prepare step has not run")
    return load_params(path)


def _small(value: Any) -> Any:
    """What goes to XCom: scalars, and dicts of scalars/dicts (metrics); lists and large values are dropped."""
    if is_dataclass(value):
        value = asdict(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        kept = {str(k): _small(v) for k, v in value.items()}
        return {k: v for k, v in kept.items() if v is not _DROP}
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return _DROP


_DROP = object()


def _log_validation_summary(layout: Layout) -> None:
    from pipeline.data.validation import SUMMARY_FILE

    path = layout.reports_dir / SUMMARY_FILE
    if not path.exists():
        return
    summary = json.loads(path.read_text(encoding="utf-8"))
    counts = {k: summary.get(k) for k in ("rows_in", "rows_passed", "rows_quarantined", "quarantine_share")}
    logger.error("Great Expectations validation failed (%s): %s", path, json.dumps(counts))
    for failure in summary.get("failures", []):
        logger.error("  failed: %s", failure)
    for item in summary.get("expectations", []) + summary.get("checks", []):
        if item.get("success") is False:
            logger.error("  %s", json.dumps({k: v for k, v in item.items() if v is not None}, default=str))


def run_stage(stage: str, root: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Run one pipeline stage on a run root with the CLI's wiring; return a small, JSON-able summary."""
    from pipeline.orchestration.cli import STAGES

    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; choose one of {sorted(STAGES)}")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    root = Path(root)
    params = run_params(root)
    layout = Layout(root)
    logger.info("%s: running on %s", stage, root)
    try:
        result = STAGES[stage](params, layout, **kwargs)
    except ValidationFailed:
        _log_validation_summary(layout)
        raise
    summary = _small(result)
    return {"root": str(root), "stage": stage, "result": summary if isinstance(summary, dict) else None}
