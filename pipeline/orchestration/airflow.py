"""What the Airflow DAGs in dags/ share: default_args, the GPU pool and queue, the form, the task group.

The DAG files are wiring only; what two of them would otherwise each write again lives here, once:

- `dag_settings`: what every LeanRec DAG sets alike (start date, no catchup, tags, default_args).
- `DEFAULT_ARGS`: every DAG's `default_args` (its owner, `OWNER`, and retries). A task retries with exponential backoff (a network
  source, a busy GPU node, a tracking server that restarts) unless it sets `retries=0`: the
  deterministic ones do (validation, the gate: same inputs, same outcome). A `PipelineError` (bad
  configuration, bad data) fails its task at once whatever its retries (`task_stage`).
- `gpu_pool`, `gpu_queue`, `gpu_task_args`: where the tasks that want a GPU run.
- `champion_asset`: the Asset the promote task updates when it moves the registry's `champion`
  alias; `leanrec_recommend` is scheduled on it.
- `schedule`: a DAG's schedule from an environment variable (a cron or preset, or the champion).
- `training_form`, `overrides_field`: the form fields (`Param`s) of the DAGs that train, built here
  from one spec; each DAG adds only its own.
- `stage_task`: a task that runs one stage on the run root its upstream task returned (`STAGE_DOCS`:
  each stage task's documentation in the UI).
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

from airflow.sdk import Asset, Param, get_current_context, task, task_group
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from pipeline.core.config import TRAINED_VARIANTS, Params
from pipeline.core.errors import PipelineError
from pipeline.orchestration import runs

# Who answers for the DAGs' runs (the UI's Owner column, filterable).
OWNER = "leanrec-ml"

# Every DAG's default_args: its owner, and retries with exponential backoff, for the transient failures.
# The tasks whose outcome a retry cannot change set retries=0 themselves.
DEFAULT_ARGS: dict[str, Any] = {
    "owner": OWNER,
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


PROJECT_TAG = "leanrec"


def dag_settings(tags: tuple[str, ...] = (), **settings: Any) -> dict[str, Any]:
    """Arguments of `@dag` that every LeanRec DAG shares, updated with the DAG's own `settings`; its
    `tags` (what it does: training, serving...) come after the project's tag."""
    return {"start_date": START_DATE, "catchup": False, "tags": [PROJECT_TAG, *tags], "default_args": dict(DEFAULT_ARGS),
            **settings}


# ----------------------------------------------------------------------------- the champion's Asset

# The schedule value (of $LEANREC_RECOMMEND_SCHEDULE) that means "when the champion changes".
ON_CHAMPION = "champion"


def champion_asset(model_name: str) -> Asset:
    """The registry's `champion` of `model_name`, as an Airflow Asset: the promote task updates it (an
    asset event) when it moves the alias, and a DAG scheduled on it runs after each new champion.

    One Asset per registered model (registry.model_name, which a form may not change): both sides of
    the wiring build it from the same params.yaml.
    """
    return Asset(name=f"leanrec_champion_{model_name}", uri=f"leanrec://registry/{model_name}/champion",
                 group="model")


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


def schedule(variable: str, default: str = "@daily", champion: Asset | None = None) -> str | list[Asset] | None:
    """A DAG's schedule from the environment variable `variable` (a cron expression or preset such as
    @daily or @hourly); `none` (or empty) means manual triggers only; `champion` (ON_CHAMPION), the
    `champion` Asset: a run each time the promote task moves the champion."""
    value = os.environ.get(variable, default).strip()
    if value.lower() == ON_CHAMPION:
        if champion is None:
            raise ValueError(f"{variable}={value}: this DAG cannot be scheduled on the champion")
        return [champion]
    return None if value.lower() in ("", "none") else value


def task_stage(stage: str, root: str | Path, **kwargs: Any) -> dict[str, Any]:
    """`runs.run_stage` inside an Airflow task: a PipelineError fails the task without its retries."""
    try:
        return runs.run_stage(stage, root, **kwargs)
    except PipelineError as err:
        raise AirflowFailException(f"{stage} failed: {err}") from err


# Each stage task's documentation (its doc_md in the UI's task details): what it reads and writes in
# the run directory, and what to do when it fails.
STAGE_DOCS: dict[str, str] = {
    "ingest": "Reads the configured source (synthetic, MovieLens or a file) into `data/raw/interactions.parquet`; "
              "rows it cannot parse go to `data/quarantine/ingest.parquet`. Report: `reports/ingest.json`. "
              "Retried (a network source may be briefly unreachable).",
    "validate": "Great Expectations checks of the raw interactions: the passing rows go to "
                "`data/validated/interactions.parquet`, the failing ones to `data/quarantine/validate.parquet`. "
                "Fails (no retry: the same data fails the same way) when too many rows fail; the log lists each "
                "failed expectation. Report: `reports/validation.json`.",
    "select-new": "Keeps the ingested rows the champion's reference interactions do not hold; with none it "
                  "skips every later task (the run ends successful, nothing to do).",
    "drift": "Compares the new interactions with the reference (new users and items, popularity shift) and "
             "fails, or warns (`drift.action`), when they moved too far. Report: `reports/drift.json`.",
    "merge-reference": "Appends the new validated interactions to the champion's reference interactions: "
                       "the data the fine-tuned model is trained and judged on.",
    "features": "Filters (ratings, duplicates, k-core), numbers users and items (an incremental run extends the "
                "champion's vocabularies) and splits them: `data/features/`. Report: `reports/features.json`.",
    "evaluate": "Test-split metrics of the trained model and its baselines (`reports/metrics.json`), and the "
                "teacher beside each compressed variant: quality, size, latency (`reports/compression.json`).",
    "register": "Registers the registry policy's pick among the teacher and its variants in MLflow as the "
                "`challenger` (an identical model already registered is reused); headline figures: "
                "`reports/summary.json`.",
    "recommend": "Top-K recommendations of every known user with the registry's champion: "
                 "`data/recommendations/recommendations.parquet`. Report: `reports/recommend.json`.",
}


def stage_task(stage: str, **task_args: Any) -> Any:
    """A task (a `@task` factory, called in a DAG with its upstream task's output) that runs `stage` on
    the run root that output names (`{"root": ...}`). Its task id is the stage's name with `_` for
    `-` (`merge-reference`: `merge_reference`), its doc_md the stage's STAGE_DOCS; `task_args` go
    to `@task` (retries=0, a pool...)."""
    def run_stage_on_root(upstream: dict[str, Any]) -> dict[str, Any]:
        return task_stage(stage, upstream["root"])

    run_stage_on_root.__name__ = run_stage_on_root.__qualname__ = stage.replace("-", "_")
    return task(doc_md=STAGE_DOCS[stage], **task_args)(run_stage_on_root)


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

# The trigger form's sections (each Param's `section`: the UI groups the fields under these headings),
# in their order on the form.
DATA, MODEL, TRAINING, COMPRESSION, PROMOTION, RECOMMENDATIONS, ADVANCED = (
    "Data", "Model", "Training", "Compression", "Promotion", "Recommendations", "Advanced")


def overrides_field(example: str) -> Param:
    """The form's free field: other params.yaml keys, `key=value` like the CLI's -S, limited to the
    keys a person triggering a run should set (runs.FORM_OVERRIDE_PREFIXES; the prepare task refuses
    any other, naming it)."""
    return Param(
        [], type="array", items={"type": "string", "pattern": OVERRIDE_PATTERN}, title="Other overrides",
        section=ADVANCED,
        description=f"Other params.yaml keys for this run, one key=value per line (e.g. {example}), like the "
                    f"CLI's -S. Allowed: {', '.join(runs.FORM_OVERRIDE_PREFIXES)} and the keys under them, except "
                    f"{', '.join(runs.FORM_OVERRIDE_REFUSED)} (paths, the tracking server and the registry are "
                    "set in params.yaml or with the CLI).",
    )


def training_form(defaults: Params, **own: Param) -> dict[str, Param]:
    """The form of the DAGs that train: the data fields, the DAG's `own` fields, then training,
    compression, the promotion policy (and whether the run may promote at all) and other overrides
    (the order of the fields in the UI, each group a section of its own: DATA, MODEL for the DAG's
    own fields, TRAINING, COMPRESSION, PROMOTION, ADVANCED).

    Defaults come from `defaults` (the project's params.yaml); runs.FORM_KEYS maps each field to its
    params key. Every call builds new Param objects from this one spec, so two DAGs share the spec,
    never the objects.
    """
    variants = list(runs.COMPRESSION_VARIANTS)
    data = {
        "source": Param(
            defaults.ingest.source, type="string", enum=runs.choices("ingest.source"), title="Data source", section=DATA,
            description="Where interactions come from: generated synthetic logs, a MovieLens dataset, or a "
                        "CSV/Parquet file (column mapping from params.yaml ingest.file). An incremental run "
                        "drops the rows the champion was already trained on.",
        ),
        "data_path": Param(
            None, type=["null", "string"], title="Data path", section=DATA,
            description="MovieLens directory or file, or the CSV/Parquet file, for the movielens and file "
                        "sources (the file source also reads an object-store URI: s3://bucket/logs/). Relative paths are "
                        "relative to the project. Empty: the path in params.yaml.",
        ),
        "synthetic_interactions": Param(
            defaults.ingest.synthetic.n_interactions, type="integer", minimum=1_000, maximum=100_000_000,
            title="Synthetic interactions", section=DATA, description="Number of interactions generated (synthetic source only).",
        ),
        "synthetic_items": Param(
            defaults.ingest.synthetic.n_items, type="integer", minimum=20,
            title="Synthetic items", section=DATA, description="Catalogue size of the generated data (synthetic source only).",
        ),
        "data_engine": Param(
            defaults.data_engine, type="string", enum=runs.choices("data_engine"), title="Data engine", section=DATA,
            description="Where validate and features run: pandas in memory, duckdb out of core (bounded memory, spills "
                        "to disk), or spark (params.yaml spark.master: local, or an existing cluster; needs Java 17+ "
                        "on the worker). Every engine writes the same files.",
        ),
    }
    training = {
        "epochs": Param(
            defaults.train.epochs, type="integer", minimum=1, maximum=1_000, title="Epochs", section=TRAINING,
            description="Maximum training epochs (an incremental run: fine-tuning epochs from the champion); "
                        "early stopping on validation NDCG@10 may end sooner.",
        ),
        "compression_variants": Param(
            list(defaults.compress.variants), type="array", items={"type": "string", "enum": variants},
            examples=variants, uniqueItems=True, title="Compression variants", section=COMPRESSION,
            description="Compressed variants built from the trained model, one parallel task each: fp32 (the "
                        "teacher's weights as they are), fp16/bf16 weights, int8/int4 (int8 Linear layers + row-wise "
                        "int8/int4 item table), pruned (heads, FFN channels and weights, fine-tuned), distilled (smaller "
                        "student), lowrank (SVD item table, fine-tuned; not a default), distilled+int8, pq (item "
                        "codes: uint8 codes into shared codebooks, fine-tuned) "
                        "and pq+int8 (its codebooks in int8). The evaluate task measures each against the teacher.",
        ),
        "promotion_metric": Param(
            defaults.registry.policy.metric, type="string", enum=runs.choices("registry.policy.metric"),
            title="Candidate metric", section=PROMOTION,
            description="Test metric that picks the model to register among the teacher and its compressed "
                        "variants (highest wins among those within the latency budget; ties: the smaller model).",
        ),
        "promotion_tolerance": Param(
            defaults.registry.ndcg_tolerance, type="number", minimum=0.0, exclusiveMaximum=1.0,
            title="Promotion tolerance", section=PROMOTION,
            description="The gate: the registered challenger becomes champion unless its NDCG@10 on this run's "
                        "test split is below the current champion's by more than this share (0.01: 1%).",
        ),
        "latency_budget_ms": Param(
            defaults.registry.policy.max_latency_p50_ms, type=["null", "number"], exclusiveMinimum=0,
            title="Latency budget (ms)", section=PROMOTION,
            description="CPU p50 latency budget per request: slower models are neither registered nor promoted. "
                        "Empty: the value in params.yaml.",
        ),
        # Whether this run may move `champion` at all (a smoke or experimental run: off); the gate
        # still runs and reports, and `challenger` is still registered.
        "allow_promotion": Param(
            defaults.registry.allow_promotion, type="boolean", title="Allow promotion", section=PROMOTION,
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


COMPRESS_DOC = ("Builds one compressed variant of the trained teacher (this map index's variant: fp16, bf16, "
                "int8, int4...) into `models/main/variants/<variant>/`, on a CPU worker. No retries: the same "
                "teacher gives the same variant.")
COMPRESS_WITH_TRAINING_DOC = (
    "Builds one compressed variant that fine-tunes or distils (this map index's variant: pruned, distilled, "
    "lowrank, pq and their int8 forms) into `models/main/variants/<variant>/`, in the GPU pool. "
    "distilled+int8 and pq+int8 reuse the distilled and pq models when those are current.")


def champion_moved(summary: dict[str, Any], champion: Asset) -> dict[str, Any]:
    """The promote task's end: its summary when the champion moved; otherwise a skip, the one way a
    task with `champion` among its outlets does not update it (a successful task always does)."""
    result = summary.get("result") or {}
    if not result.get("promoted"):
        raise AirflowSkipException(f"the champion did not move (decision: {result.get('decision')}; "
                                   f"{'; '.join(result.get('reasons') or [])}): no update of {champion.name}")
    return summary


@task_group(group_id=TAIL_GROUP_ID, prefix_group_id=False)
def train_and_promote(run: dict[str, Any], featurized: dict[str, Any], champion: Asset) -> Any:
    """train -> compress (one mapped task per variant) -> evaluate -> register -> promote.

    `run` holds the form's compression variants (what `start_run` returns, or a task's copy of it);
    `featurized` is the features task's output; `champion` is the Asset (`champion_asset`) promote
    updates when it moves the champion. The tasks are made on each call, when the DAG is parsed, so
    the GPU pool and queue are read from the environment then.
    """
    gpu = gpu_task_args()

    @task(**gpu)
    def train(featurized: dict[str, Any]) -> dict[str, Any]:
        """Trains the configured model (SASRec by default) and the popularity and BPR baselines on
        `data/features/` -> `models/main/` (weights, config, `history.json` per epoch). Runs in the GPU pool.
        A retried or cleared train resumes from its last epoch checkpoint and ends where an uninterrupted
        run would have."""
        return task_stage("train", featurized["root"], resume=True)

    @task
    def post_training_variants(run: dict[str, Any]) -> list[str]:
        """The form's compression variants that need no training (fp16, bf16, int8, int4...): one
        mapped `compress` task each, on CPU workers."""
        return [v for v in run["compression_variants"] if v not in TRAINED_VARIANTS]

    @task
    def trained_variants(run: dict[str, Any]) -> list[str]:
        """The form's compression variants that train (pruned, distilled, lowrank, pq and their int8
        forms): one mapped `compress_with_training` task each, in the GPU pool."""
        return [v for v in run["compression_variants"] if v in TRAINED_VARIANTS]

    # One mapped task per variant. Quantization and factorisation take seconds of CPU and run in
    # parallel anywhere; pruning and distillation train, so they go to the GPU pool and queue.
    # A mapped task takes no doc_md from its docstring: it is given explicitly.
    @task(retries=0, doc_md=COMPRESS_DOC)
    def compress(trained: dict[str, Any], variant: str) -> dict[str, Any]:
        return task_stage("compress", trained["root"], variant=variant)

    @task(retries=0, doc_md=COMPRESS_WITH_TRAINING_DOC, **gpu)
    def compress_with_training(trained: dict[str, Any], variant: str) -> dict[str, Any]:
        return task_stage("compress", trained["root"], variant=variant)

    # The gate is deterministic (same figures, same decision): no retries.
    @task(retries=0, outlets=[champion])
    def promote(registered: dict[str, Any]) -> dict[str, Any]:
        """The gate: the `challenger` becomes `champion` unless its NDCG@10 on this run's test split is
        below the champion's by more than the tolerance, or it breaks the latency budget; the decision
        and its reasons are in `reports/promotion.json`. When the champion moves, this task updates
        the champion Asset (which schedules `leanrec_recommend`); when it does not, the task is skipped."""
        return champion_moved(task_stage("promote", registered["root"]), champion)

    # none_failed: an empty variant list skips the mapped compress tasks, which must not skip evaluate
    # (in leanrec_incremental a short-circuited select_new still skips it: it skips every task after it).
    evaluate = stage_task("evaluate", retries=0, trigger_rule="none_failed", **gpu)
    register = stage_task("register", retries=0)

    trained = train(featurized)
    compressed = [
        compress.partial(trained=trained).expand(variant=post_training_variants(run)),
        compress_with_training.partial(trained=trained).expand(variant=trained_variants(run)),
    ]
    evaluated = evaluate(trained)
    compressed >> evaluated
    return promote(register(evaluated))
