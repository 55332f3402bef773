"""What the Airflow DAGs in dags/ share: default_args, the GPU pool and queue, the form, the task group.

The DAG files are wiring only; what two of them would otherwise each write again lives here, once:

- `dag_settings`: what every LeanRec DAG sets alike (start date, no catchup, tag, default_args).
- `DEFAULT_ARGS`: every DAG's `default_args`. A task retries with exponential backoff (a network
  source, a busy GPU node, a tracking server that restarts) unless it sets `retries=0`: the
  deterministic ones do (validation, the gate: same inputs, same outcome). A `PipelineError` (bad
  configuration, bad data) fails its task at once whatever its retries (`task_stage`).
- `gpu_pool`, `gpu_queue`, `gpu_task_args`: where the tasks that want a GPU run.
- `schedule`: a DAG's schedule from an environment variable.
- `training_form`, `overrides_field`: the form fields (`Param`s) of the DAGs that train, built here
  from one spec; each DAG adds only its own.
- `stage_task`: a task that runs one stage on the run root its upstream task returned.
- `start_run`: the body of a training DAG's `prepare` task.
- `train_and_promote`: the task group train -> compress (mapped: CPU variants, GPU-pool variants)
  -> evaluate -> register -> promote, which `leanrec_train` and `leanrec_incremental` both end with.

Cheap to import at DAG parse time: `airflow.sdk` and the params schema, no torch (the stages import
what they need when a task runs). `pipeline.orchestration.runs` keeps the Airflow-free part.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from airflow.sdk import Param, get_current_context, task, task_group
from airflow.sdk.exceptions import AirflowFailException

from pipeline.core.config import TRAINED_VARIANTS, Params
from pipeline.core.errors import PipelineError
from pipeline.orchestration import runs

# Every DAG's default_args: retries with exponential backoff, for the transient failures. The tasks
# whose outcome a retry cannot change set retries=0 themselves.
DEFAULT_ARGS: dict[str, Any] = {
    "retries": 2,
    "retry_delay": dt.timedelta(seconds=20),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": dt.timedelta(minutes=10),
}

START_DATE = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

# The group's id (its box in the UI). Its tasks keep their own ids (`train`, `evaluate`, ...):
# prefix_group_id=False, so task ids, logs, XCom paths and the API stay those of the tasks.
TAIL_GROUP_ID = "train_and_promote"

OVERRIDE_PATTERN = r"^[A-Za-z0-9_.]+=.*$"


def dag_settings(**settings: Any) -> dict[str, Any]:
    """Arguments of `@dag` that every LeanRec DAG shares, updated with the DAG's own `settings`."""
    return {"start_date": START_DATE, "catchup": False, "tags": ["leanrec"], "default_args": dict(DEFAULT_ARGS),
            **settings}


def gpu_pool() -> str:
    """The Airflow pool of tasks that want a GPU ($LEANREC_GPU_POOL, default `gpu`; one slot by default)."""
    return os.environ.get("LEANREC_GPU_POOL") or "gpu"


def gpu_queue() -> str:
    """The executor queue of tasks that want a GPU ($LEANREC_GPU_QUEUE, default `gpu`): a Celery worker
    started with `-q gpu` on a GPU machine picks them up; the local executor ignores queues."""
    return os.environ.get("LEANREC_GPU_QUEUE") or "gpu"


def gpu_task_args() -> dict[str, str]:
    """Task arguments of a task that wants a GPU: its pool and queue (read when the DAG is parsed)."""
    return {"pool": gpu_pool(), "queue": gpu_queue()}


def schedule(variable: str, default: str = "@daily") -> str | None:
    """A DAG's schedule from the environment variable `variable` (a cron expression or preset such as
    @daily or @hourly); `none` (or empty) means manual triggers only."""
    value = os.environ.get(variable, default).strip()
    return None if value.lower() in ("", "none") else value


def task_stage(stage: str, root: str | Path, **kwargs: Any) -> dict[str, Any]:
    """`runs.run_stage` inside an Airflow task: a PipelineError fails the task without its retries."""
    try:
        return runs.run_stage(stage, root, **kwargs)
    except PipelineError as err:
        raise AirflowFailException(f"{stage} failed: {err}") from err


def stage_task(stage: str, **task_args: Any) -> Any:
    """A task (a `@task` factory, called in a DAG with its upstream task's output) that runs `stage` on
    the run root that output names (`{"root": ...}`). Its task id is the stage's name with `_` for
    `-` (`merge-reference`: `merge_reference`); `task_args` go to `@task` (retries=0, a pool...)."""
    def run_stage_on_root(upstream: dict[str, Any]) -> dict[str, Any]:
        return task_stage(stage, upstream["root"])

    run_stage_on_root.__name__ = run_stage_on_root.__qualname__ = stage.replace("-", "_")
    run_stage_on_root.__doc__ = f"The `{stage}` stage on the run root of the upstream task."
    return task(**task_args)(run_stage_on_root)


def start_run(prepare: Callable[[str, dict[str, Any]], Path], failure: str) -> dict[str, Any]:
    """The body of a training DAG's `prepare` task: `prepare(run_id, form)` makes the run root.

    Returns what the later tasks read: the root, and the compression variants the form asked for
    (the mapped compress tasks expand over them). A PipelineError fails the task at once, `failure`
    first in its message.
    """
    context = get_current_context()
    form = dict(context["params"])
    try:
        root = prepare(context["run_id"], form)
    except PipelineError as err:
        raise AirflowFailException(f"{failure}: {err}") from err
    return {"root": str(root), "compression_variants": list(form.get("compression_variants") or [])}


# ----------------------------------------------------------------------------- the form


def overrides_field(example: str) -> Param:
    """The form's free field: other params.yaml keys, `key=value` like the CLI's -S, limited to the
    keys a person triggering a run should set (runs.FORM_OVERRIDE_PREFIXES; the prepare task refuses
    any other, naming it)."""
    return Param(
        [], type="array", items={"type": "string", "pattern": OVERRIDE_PATTERN}, title="Other overrides",
        description=f"Other params.yaml keys for this run, one key=value per line (e.g. {example}), like the "
                    f"CLI's -S. Allowed: {', '.join(runs.FORM_OVERRIDE_PREFIXES)} and the keys under them, except "
                    f"{', '.join(runs.FORM_OVERRIDE_REFUSED)} (paths, the tracking server and the registry are "
                    "set in params.yaml or with the CLI).",
    )


def training_form(defaults: Params, **own: Param) -> dict[str, Param]:
    """The form of the DAGs that train: the data fields, the DAG's `own` fields, then training,
    compression, the promotion policy (and whether the run may promote at all) and other overrides
    (the order of the fields in the UI).

    Defaults come from `defaults` (the project's params.yaml); runs.FORM_KEYS maps each field to its
    params key. Every call builds new Param objects from this one spec, so two DAGs share the spec,
    never the objects.
    """
    variants = list(runs.COMPRESSION_VARIANTS)
    data = {
        "source": Param(
            defaults.ingest.source, type="string", enum=runs.choices("ingest.source"), title="Data source",
            description="Where interactions come from: generated synthetic logs, a MovieLens dataset, or a "
                        "CSV/Parquet file (column mapping from params.yaml ingest.file). An incremental run "
                        "drops the rows the champion was already trained on.",
        ),
        "data_path": Param(
            None, type=["null", "string"], title="Data path",
            description="MovieLens directory or file, or the CSV/Parquet file, for the movielens and file "
                        "sources. Relative paths are relative to the project. Empty: the path in params.yaml.",
        ),
        "synthetic_interactions": Param(
            defaults.ingest.synthetic.n_interactions, type="integer", minimum=1_000, maximum=100_000_000,
            title="Synthetic interactions", description="Number of interactions generated (synthetic source only).",
        ),
        "synthetic_items": Param(
            defaults.ingest.synthetic.n_items, type="integer", minimum=20,
            title="Synthetic items", description="Catalogue size of the generated data (synthetic source only).",
        ),
    }
    training = {
        "epochs": Param(
            defaults.train.epochs, type="integer", minimum=1, maximum=1_000, title="Epochs",
            description="Maximum training epochs (an incremental run: fine-tuning epochs from the champion); "
                        "early stopping on validation NDCG@10 may end sooner.",
        ),
        "compression_variants": Param(
            list(defaults.compress.variants), type="array", items={"type": "string", "enum": variants},
            examples=variants, uniqueItems=True, title="Compression variants",
            description="Compressed variants built from the trained model, one parallel task each: fp32 (the "
                        "teacher's weights as they are), fp16/bf16 weights, int8/int4 (int8 Linear layers + row-wise "
                        "int8/int4 item table), pruned (heads, FFN channels and weights, fine-tuned), distilled (smaller "
                        "student), lowrank (SVD item table, fine-tuned; not a default), distilled+int8, pq (item "
                        "codes: uint8 codes into shared codebooks, fine-tuned) "
                        "and pq+int8 (its codebooks in int8). The evaluate task measures each against the teacher.",
        ),
        "promotion_metric": Param(
            defaults.registry.policy.metric, type="string", enum=runs.choices("registry.policy.metric"),
            title="Candidate metric",
            description="Test metric that picks the model to register among the teacher and its compressed "
                        "variants (highest wins among those within the latency budget; ties: the smaller model).",
        ),
        "promotion_tolerance": Param(
            defaults.registry.ndcg_tolerance, type="number", minimum=0.0, exclusiveMaximum=1.0,
            title="Promotion tolerance",
            description="The gate: the registered challenger becomes champion unless its NDCG@10 on this run's "
                        "test split is below the current champion's by more than this share (0.01: 1%).",
        ),
        "latency_budget_ms": Param(
            defaults.registry.policy.max_latency_p50_ms, type=["null", "number"], exclusiveMinimum=0,
            title="Latency budget (ms)",
            description="CPU p50 latency budget per request: slower models are neither registered nor promoted. "
                        "Empty: the value in params.yaml.",
        ),
        # Whether this run may move `champion` at all (a smoke or experimental run: off); the gate
        # still runs and reports, and `challenger` is still registered.
        "allow_promotion": Param(
            defaults.registry.allow_promotion, type="boolean", title="Allow promotion",
            description="On: the registered challenger becomes champion if it passes the gate. Off: the run "
                        "registers and gates it, reports the decision, and never moves champion (a smoke or "
                        "experimental run).",
        ),
        "overrides": overrides_field("train.lr=0.001 or drift.action=warn"),
    }
    clash = set(own) & (set(data) | set(training))
    if clash:
        raise ValueError(f"form fields {sorted(clash)} are already in the shared training form")
    return {**data, **own, **training}


# ----------------------------------------------------------------------------- the shared tail


@task_group(group_id=TAIL_GROUP_ID, prefix_group_id=False)
def train_and_promote(run: dict[str, Any], featurized: dict[str, Any]) -> Any:
    """train -> compress (one mapped task per variant) -> evaluate -> register -> promote.

    `run` holds the form's compression variants (what `start_run` returns, or a task's copy of it);
    `featurized` is the features task's output. The tasks are made on each call, when the DAG is
    parsed, so the GPU pool and queue are read from the environment then.
    """
    gpu = gpu_task_args()

    # resume: a retried or cleared train continues from its last epoch checkpoint (or starts
    # fresh when there is none) and ends where an uninterrupted run would have.
    @task(**gpu)
    def train(featurized: dict[str, Any]) -> dict[str, Any]:
        return task_stage("train", featurized["root"], resume=True)

    @task
    def post_training_variants(run: dict[str, Any]) -> list[str]:
        return [v for v in run["compression_variants"] if v not in TRAINED_VARIANTS]

    @task
    def trained_variants(run: dict[str, Any]) -> list[str]:
        return [v for v in run["compression_variants"] if v in TRAINED_VARIANTS]

    # One mapped task per variant. Quantization and factorisation take seconds of CPU and run in
    # parallel anywhere; pruning and distillation train, so they go to the GPU pool and queue.
    @task(retries=0)
    def compress(trained: dict[str, Any], variant: str) -> dict[str, Any]:
        return task_stage("compress", trained["root"], variant=variant)

    @task(retries=0, **gpu)
    def compress_with_training(trained: dict[str, Any], variant: str) -> dict[str, Any]:
        return task_stage("compress", trained["root"], variant=variant)

    # none_failed: an empty variant list skips the mapped compress tasks, which must not skip evaluate
    # (in leanrec_incremental a short-circuited select_new still skips it: it skips every task after it).
    evaluate = stage_task("evaluate", retries=0, trigger_rule="none_failed", **gpu)
    # The gate is deterministic (same figures, same decision): no retries.
    register = stage_task("register", retries=0)
    promote = stage_task("promote", retries=0)

    trained = train(featurized)
    compressed = [
        compress.partial(trained=trained).expand(variant=post_training_variants(run)),
        compress_with_training.partial(trained=trained).expand(variant=trained_variants(run)),
    ]
    evaluated = evaluate(trained)
    compressed >> evaluated
    return promote(register(evaluated))
