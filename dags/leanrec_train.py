"""DAG `leanrec_train`: train LeanRec from a form in the Airflow UI (manual trigger only).

Wiring only. Each task calls a `pipeline/` function, the same ones `python -m pipeline` and
`dvc repro` run (`pipeline.orchestration.runs.run_stage` goes through the CLI's stage table), in the DAG
run's own work directory (`pipeline.orchestration.runs.prepare_run`: `$LEANREC_RUNS_DIR/<run id>`, holding the
run's effective params.yaml). XCom carries the run directory and small summaries only.

    prepare -> ingest -> validate -> features -> train -> compress (one mapped task per variant)
            -> evaluate -> register -> promote

`register` registers the policy's pick (`registry.policy`) as the `challenger`; `promote` moves the
`champion` alias to it only if it passes the gate (`registry.ndcg_tolerance`, latency budget); the
decision is in the run's reports/promotion.json either way.

The form's defaults come from the project's params.yaml; `overrides` takes any other key as
`key=value`, like the CLI's `-S`.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from airflow.sdk import Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from pipeline.core.config import TRAINED_VARIANTS, load_params
from pipeline.core.errors import PipelineError
from pipeline.orchestration import runs

DEFAULTS = load_params(runs.params_path())

# Transient failures (a network source, a busy GPU node) are retried with exponential backoff;
# a PipelineError (bad config, bad data) is deterministic and fails the task at once.
RETRY = runs.RETRY
GPU = runs.gpu_task_args()


_stage = runs.task_stage


@dag(
    dag_id="leanrec_train",
    description="Ingest, validate, build features, train and evaluate LeanRec in a run directory of its own",
    schedule=None,
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=4,
    tags=["leanrec"],
    doc_md=__doc__,
    params={
        "source": Param(
            DEFAULTS.ingest.source, type="string", enum=runs.choices("ingest.source"),
            title="Data source",
            description="Where interactions come from: generated synthetic logs, a MovieLens dataset, "
                        "or a CSV/Parquet file (column mapping from params.yaml ingest.file).",
        ),
        "data_path": Param(
            None, type=["null", "string"], title="Data path",
            description="MovieLens directory or file, or the CSV/Parquet file, for the movielens and file "
                        "sources. Relative paths are relative to the project. Empty: the path in params.yaml.",
        ),
        "synthetic_interactions": Param(
            DEFAULTS.ingest.synthetic.n_interactions, type="integer", minimum=1_000, maximum=100_000_000,
            title="Synthetic interactions", description="Number of interactions generated (synthetic source only).",
        ),
        "synthetic_items": Param(
            DEFAULTS.ingest.synthetic.n_items, type="integer", minimum=20,
            title="Synthetic items", description="Catalogue size of the generated data (synthetic source only).",
        ),
        "model": Param(
            DEFAULTS.train.model, type="string", enum=runs.choices("train.model"), title="Model",
            description="The model this run trains; the popularity and BPR baselines are trained beside it.",
        ),
        "preset": Param(
            DEFAULTS.train.preset, type="string", enum=runs.choices("train.preset"), title="Model preset",
            description="SASRec shape: small (~0.3M parameters), medium, large (100M+).",
        ),
        "epochs": Param(
            DEFAULTS.train.epochs, type="integer", minimum=1, maximum=1_000, title="Epochs",
            description="Maximum training epochs (early stopping on validation NDCG@10 may end sooner).",
        ),
        "compression_variants": Param(
            list(DEFAULTS.compress.variants), type="array", items={"type": "string", "enum": list(runs.COMPRESSION_VARIANTS)},
            examples=list(runs.COMPRESSION_VARIANTS), uniqueItems=True, title="Compression variants",
            description="Compressed variants built from the trained model, one parallel task each: fp16/bf16 "
                        "weights, int8/int4 (torchao int8 Linear layers + row-wise int8/int4 item table), pruned "
                        "(heads, FFN channels and weights, fine-tuned), distilled (smaller student), lowrank "
                        "(SVD item table), distilled+int8. The evaluate task measures each against the teacher.",
        ),
        "promotion_metric": Param(
            DEFAULTS.registry.policy.metric, type="string", enum=runs.choices("registry.policy.metric"),
            title="Candidate metric",
            description="Test metric that picks the model to register among the teacher and its compressed "
                        "variants (highest wins among those within the latency budget; ties: the smaller model).",
        ),
        "promotion_tolerance": Param(
            DEFAULTS.registry.ndcg_tolerance, type="number", minimum=0.0, exclusiveMaximum=1.0,
            title="Promotion tolerance",
            description="The gate: the registered challenger becomes champion unless its NDCG@10 on this run's "
                        "test split is below the current champion's by more than this share (0.01: 1%).",
        ),
        "latency_budget_ms": Param(
            DEFAULTS.registry.policy.max_latency_p50_ms, type=["null", "number"], exclusiveMinimum=0,
            title="Latency budget (ms)",
            description="CPU p50 latency budget per request: slower models are neither registered nor promoted. "
                        "Empty: the value in params.yaml.",
        ),
        "overrides": Param(
            [], type="array", items={"type": "string", "pattern": r"^[A-Za-z0-9_.]+=.*$"}, title="Other overrides",
            description="Any other params.yaml key for this run, one key=value per line "
                        "(e.g. train.lr=0.001), exactly like the CLI's -S.",
        ),
    },
)
def leanrec_train() -> None:
    @task
    def prepare() -> dict[str, Any]:
        """The run directory and its effective params.yaml (params.yaml + the form)."""
        context = get_current_context()
        form = dict(context["params"])
        try:
            root = runs.prepare_run(context["run_id"], form)
        except PipelineError as err:
            raise AirflowFailException(f"invalid run parameters: {err}") from err
        return {"root": str(root), "compression_variants": list(form.get("compression_variants") or [])}

    @task(**RETRY)
    def ingest(run: dict[str, Any]) -> dict[str, Any]:
        return _stage("ingest", run["root"])

    @task(retries=0)
    def validate(ingested: dict[str, Any]) -> dict[str, Any]:
        return _stage("validate", ingested["root"])

    @task(retries=0)
    def features(validated: dict[str, Any]) -> dict[str, Any]:
        return _stage("features", validated["root"])

    @task(**RETRY, **GPU)
    def train(featurized: dict[str, Any]) -> dict[str, Any]:
        # resume: a retried or cleared train continues from its last epoch checkpoint (or starts
        # fresh when there is none) and ends where an uninterrupted run would have.
        return _stage("train", featurized["root"], resume=True)

    # none_failed: an empty variant list skips the mapped compress tasks, which must not skip evaluate.
    @task(retries=0, trigger_rule="none_failed", **GPU)
    def evaluate(trained: dict[str, Any]) -> dict[str, Any]:
        return _stage("evaluate", trained["root"])

    # The gate is deterministic (same figures, same decision): no retries.
    @task(retries=0)
    def register(evaluated: dict[str, Any]) -> dict[str, Any]:
        return _stage("register", evaluated["root"])

    @task(retries=0)
    def promote(registered: dict[str, Any]) -> dict[str, Any]:
        return _stage("promote", registered["root"])

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
        return _stage("compress", trained["root"], variant=variant)

    @task(retries=0, **GPU)
    def compress_with_training(trained: dict[str, Any], variant: str) -> dict[str, Any]:
        return _stage("compress", trained["root"], variant=variant)

    run = prepare()
    trained = train(features(validate(ingest(run))))
    compressed = [
        compress.partial(trained=trained).expand(variant=post_training_variants(run)),
        compress_with_training.partial(trained=trained).expand(variant=trained_variants(run)),
    ]
    evaluated = evaluate(trained)
    compressed >> evaluated
    promote(register(evaluated))

leanrec_train()
