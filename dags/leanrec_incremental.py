"""DAG `leanrec_incremental`: fine-tune the champion on the interactions that arrived since (scheduled).

Wiring only: every task calls a `pipeline/` function through `pipeline.orchestration.runs`, in the DAG run's own
work directory. `prepare` finds the current champion and what it was trained on from its registry
tags (`pipeline.registry.lineage.champion_lineage`): the reference interactions, the vocabularies, the
teacher model and its shape; then

    prepare -> ingest -> select_new -> validate -> drift -> merge_reference -> features -> train
            -> compress (one mapped task per variant) -> evaluate -> register -> promote

`select_new` keeps the ingested rows the reference does not hold; with none, it skips every task
after it and the run ends successful (a no-op). `drift` checks the new rows against the reference
(new users/items share, popularity shift; `drift.action`), `merge_reference` appends them to the
reference, `features` extends the champion's vocabularies (old IDs keep their index), `train`
fine-tunes the champion's teacher with its item table grown for new items, and `promote` runs the
same gate as `leanrec_train`. No champion: `prepare` fails (train one with `leanrec_train` first).

Schedule: `$LEANREC_INCREMENTAL_SCHEDULE` (default @daily; `none`: manual only), no catchup, one run
at a time (each starts from the champion the previous one may have replaced).
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from airflow.sdk import Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from pipeline.core.config import TRAINED_VARIANTS, load_params
from pipeline.core.errors import PipelineError
from pipeline.orchestration import runs

logger = logging.getLogger(__name__)
DEFAULTS = load_params(runs.params_path())
RETRY = runs.RETRY
GPU = runs.gpu_task_args()


_stage = runs.task_stage


@dag(
    dag_id="leanrec_incremental",
    description="Fine-tune the champion on new interactions, then register and promote through the gate",
    schedule=runs.schedule("LEANREC_INCREMENTAL_SCHEDULE"),
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    tags=["leanrec"],
    doc_md=__doc__,
    params={
        "source": Param(
            DEFAULTS.ingest.source, type="string", enum=runs.choices("ingest.source"), title="Data source",
            description="Where the interactions come from; rows the champion was already trained on are dropped.",
        ),
        "data_path": Param(
            None, type=["null", "string"], title="Data path",
            description="MovieLens directory or CSV/Parquet file for the movielens and file sources. "
                        "Empty: the path in params.yaml.",
        ),
        "synthetic_interactions": Param(
            DEFAULTS.ingest.synthetic.n_interactions, type="integer", minimum=1_000, maximum=100_000_000,
            title="Synthetic interactions", description="Number of interactions generated (synthetic source only).",
        ),
        "synthetic_items": Param(
            DEFAULTS.ingest.synthetic.n_items, type="integer", minimum=20,
            title="Synthetic items", description="Catalogue size of the generated data (synthetic source only).",
        ),
        "epochs": Param(
            DEFAULTS.train.epochs, type="integer", minimum=1, maximum=1_000, title="Epochs",
            description="Maximum fine-tuning epochs from the champion (early stopping may end sooner).",
        ),
        "compression_variants": Param(
            list(DEFAULTS.compress.variants), type="array",
            items={"type": "string", "enum": list(runs.COMPRESSION_VARIANTS)},
            examples=list(runs.COMPRESSION_VARIANTS), uniqueItems=True, title="Compression variants",
            description="Compressed variants built from the fine-tuned model, one parallel task each.",
        ),
        "promotion_metric": Param(
            DEFAULTS.registry.policy.metric, type="string", enum=runs.choices("registry.policy.metric"),
            title="Candidate metric",
            description="Test metric that picks the model to register among the fine-tuned teacher and its variants.",
        ),
        "promotion_tolerance": Param(
            DEFAULTS.registry.ndcg_tolerance, type="number", minimum=0.0, exclusiveMaximum=1.0,
            title="Promotion tolerance",
            description="The gate: the challenger becomes champion unless its NDCG@10 on this run's test split "
                        "is below the current champion's by more than this share.",
        ),
        "latency_budget_ms": Param(
            DEFAULTS.registry.policy.max_latency_p50_ms, type=["null", "number"], exclusiveMinimum=0,
            title="Latency budget (ms)",
            description="CPU p50 latency budget per request. Empty: the value in params.yaml.",
        ),
        "overrides": Param(
            [], type="array", items={"type": "string", "pattern": r"^[A-Za-z0-9_.]+=.*$"}, title="Other overrides",
            description="Any other params.yaml key for this run, one key=value per line (e.g. drift.action=warn).",
        ),
    },
)
def leanrec_incremental() -> None:
    @task
    def prepare() -> dict[str, Any]:
        """The run directory, with the champion's lineage in its effective params.yaml."""
        context = get_current_context()
        form = dict(context["params"])
        try:
            root = runs.prepare_incremental_run(context["run_id"], form)
        except PipelineError as err:
            raise AirflowFailException(f"cannot start an incremental run: {err}") from err
        return {"root": str(root), "compression_variants": list(form.get("compression_variants") or [])}

    @task(**RETRY)
    def ingest(run: dict[str, Any]) -> dict[str, Any]:
        return _stage("ingest", run["root"])

    # No new rows: False skips every task after this one, and the run ends successful.
    @task.short_circuit(retries=0)
    def select_new(run: dict[str, Any], ingested: dict[str, Any]) -> dict[str, Any] | bool:
        selected = _stage("select-new", ingested["root"])
        if selected["result"]["empty"]:
            logger.info("no new interactions since the champion's data (%s): nothing to do",
                        selected["result"]["reference"])
            return False
        return {**run, "rows_new": selected["result"]["rows_new"]}

    @task(retries=0)
    def validate(selected: dict[str, Any]) -> dict[str, Any]:
        return _stage("validate", selected["root"])

    @task(retries=0)
    def drift(validated: dict[str, Any]) -> dict[str, Any]:
        return _stage("drift", validated["root"])

    @task(retries=0)
    def merge_reference(checked: dict[str, Any]) -> dict[str, Any]:
        return _stage("merge-reference", checked["root"])

    @task(retries=0)
    def features(merged: dict[str, Any]) -> dict[str, Any]:
        return _stage("features", merged["root"])

    @task(**RETRY, **GPU)
    def train(featurized: dict[str, Any]) -> dict[str, Any]:
        return _stage("train", featurized["root"], resume=True)

    @task
    def post_training_variants(selected: dict[str, Any]) -> list[str]:
        return [v for v in selected["compression_variants"] if v not in TRAINED_VARIANTS]

    @task
    def trained_variants(selected: dict[str, Any]) -> list[str]:
        return [v for v in selected["compression_variants"] if v in TRAINED_VARIANTS]

    @task(retries=0)
    def compress(trained: dict[str, Any], variant: str) -> dict[str, Any]:
        return _stage("compress", trained["root"], variant=variant)

    @task(retries=0, **GPU)
    def compress_with_training(trained: dict[str, Any], variant: str) -> dict[str, Any]:
        return _stage("compress", trained["root"], variant=variant)

    # none_failed: an empty variant list skips the mapped compress tasks, which must not skip evaluate
    # (a skipped select_new still skips it: the short circuit skips every task after it).
    @task(retries=0, trigger_rule="none_failed", **GPU)
    def evaluate(trained: dict[str, Any]) -> dict[str, Any]:
        return _stage("evaluate", trained["root"])

    @task(retries=0)
    def register(evaluated: dict[str, Any]) -> dict[str, Any]:
        return _stage("register", evaluated["root"])

    @task(retries=0)
    def promote(registered: dict[str, Any]) -> dict[str, Any]:
        return _stage("promote", registered["root"])

    run = prepare()
    selected = select_new(run, ingest(run))
    trained = train(features(merge_reference(drift(validate(selected)))))
    compressed = [
        compress.partial(trained=trained).expand(variant=post_training_variants(selected)),
        compress_with_training.partial(trained=trained).expand(variant=trained_variants(selected)),
    ]
    evaluated = evaluate(trained)
    compressed >> evaluated
    promote(register(evaluated))


leanrec_incremental()
