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
fine-tunes the champion's teacher with its item table grown for new items; `train` ... `promote` are
the task group `train_and_promote` of `leanrec_train` (`pipeline.orchestration.airflow`), the same
tasks and the same gate. No champion: `prepare` fails (train one with `leanrec_train` first).

Schedule: `$LEANREC_INCREMENTAL_SCHEDULE` (default @daily; `none`: manual only), no catchup, one run
at a time (each starts from the champion the previous one may have replaced). Not the champion's
Asset: this DAG moves the champion itself (each promotion would trigger another run), and a new
champion brings no new interactions. New data would be the right trigger, but nothing in the
project announces it (ingest reads the source when it runs; `select_new` finds what is new), so a
daily run that ends at `select_new` when nothing arrived is the honest default.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.sdk import dag, task

from pipeline.core.config import load_params
from pipeline.orchestration import airflow as orchestration
from pipeline.orchestration import runs

logger = logging.getLogger(__name__)
DEFAULTS = load_params(runs.params_path())


@dag(**orchestration.dag_settings(
    dag_id="leanrec_incremental",
    tags=("training", "incremental"),
    description="Fine-tune the champion on new interactions, then register and promote through the gate",
    schedule=orchestration.schedule("LEANREC_INCREMENTAL_SCHEDULE"),
    max_active_runs=1,
    doc_md=__doc__,
    # The shared training form, nothing of its own: the model and its shape are the champion's.
    params=orchestration.training_form(DEFAULTS),
))
def leanrec_incremental() -> None:
    @task
    def prepare() -> dict[str, Any]:
        """Makes the DAG run's work directory with the champion's lineage in its effective params.yaml:
        its reference interactions, vocabularies and teacher (from the champion's registry tags).
        Fails when there is no champion yet: train one with `leanrec_train` first."""
        return orchestration.start_run(runs.prepare_incremental_run, "cannot start an incremental run")

    ingest = orchestration.stage_task("ingest")

    # No new rows: False skips every task after this one, and the run ends successful.
    @task.short_circuit(retries=0)
    def select_new(run: dict[str, Any], ingested: dict[str, Any]) -> dict[str, Any] | bool:
        """Keeps the ingested interactions the champion was not trained on. None: skips every later
        task, and the run ends successful (nothing new since the champion: nothing to do)."""
        selected = orchestration.task_stage("select-new", ingested["root"])
        if selected["result"]["empty"]:
            logger.info("no new interactions since the champion's data (%s): nothing to do",
                        selected["result"]["reference"])
            return False
        return {**run, "rows_new": selected["result"]["rows_new"]}

    # Deterministic on the same data: no retries.
    validate = orchestration.stage_task("validate", retries=0)
    drift = orchestration.stage_task("drift", retries=0)
    merge_reference = orchestration.stage_task("merge-reference", retries=0)
    features = orchestration.stage_task("features", retries=0)

    run = prepare()
    selected = select_new(run, ingest(run))
    # `selected` carries the run's compression variants: after a short circuit nothing downstream runs.
    orchestration.train_and_promote(selected, features(merge_reference(drift(validate(selected)))),
                                    orchestration.champion_asset(DEFAULTS.registry.model_name))


leanrec_incremental()
