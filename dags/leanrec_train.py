"""DAG `leanrec_train`: train LeanRec from a form in the Airflow UI (manual trigger only).

Wiring only. Each task calls a `pipeline/` function, the same ones `python -m pipeline` and
`dvc repro` run (`pipeline.orchestration.runs.run_stage` goes through the CLI's stage table), in the DAG
run's own work directory (`pipeline.orchestration.runs.prepare_run`: `$LEANREC_RUNS_DIR/<run id>`, holding the
run's effective params.yaml). XCom carries the run directory and small summaries only.

    prepare -> ingest -> validate -> features -> train -> compress (one mapped task per variant)
            -> evaluate -> register -> promote

`train` ... `promote` are the task group `train_and_promote` that `leanrec_incremental` ends with too
(`pipeline.orchestration.airflow`); its tasks keep their own ids. `register` registers the policy's
pick (`registry.policy`) as the `challenger`; `promote` moves the `champion` alias to it only if it
passes the gate (`registry.ndcg_tolerance`, latency budget); the decision is in the run's
reports/promotion.json either way. When it moves the champion, `promote` updates the champion's
Asset (`leanrec_champion_<registry.model_name>`), which schedules `leanrec_recommend`.

The form's defaults come from the project's params.yaml; `overrides` takes any other key as
`key=value`, like the CLI's `-S`.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import Param, dag, task

from pipeline.core.config import load_params
from pipeline.orchestration import airflow as orchestration
from pipeline.orchestration import runs

DEFAULTS = load_params(runs.params_path())


# Retries come from the DAG's default_args (orchestration.DEFAULT_ARGS: exponential backoff, for
# transient failures); a PipelineError (bad config, bad data) fails its task at once.
@dag(**orchestration.dag_settings(
    dag_id="leanrec_train",
    tags=("training",),
    description="Ingest, validate, build features, train and evaluate LeanRec in a run directory of its own",
    schedule=None,
    max_active_runs=4,
    doc_md=__doc__,
    # The shared training form, plus this DAG's own fields: the model and its shape (an incremental
    # run keeps the champion's).
    params=orchestration.training_form(
        DEFAULTS,
        model=Param(
            DEFAULTS.train.model, type="string", enum=runs.choices("train.model"), title="Model",
            section=orchestration.MODEL,
            description="The model this run trains; the popularity and BPR baselines are trained beside it.",
        ),
        preset=Param(
            DEFAULTS.train.preset, type="string", enum=runs.choices("train.preset"), title="Model preset",
            section=orchestration.MODEL,
            description="SASRec shape: small (~0.3M parameters), medium, large (100M+).",
        ),
    ),
))
def leanrec_train() -> None:
    @task
    def prepare() -> dict[str, Any]:
        """Makes the DAG run's work directory (`$LEANREC_RUNS_DIR/<run id>`) with its effective
        params.yaml: the project's params.yaml with the form's values. A form value the schema or the
        allowed keys refuse fails the run here, naming it, before any data is read."""
        return orchestration.start_run(runs.prepare_run, "invalid run parameters")

    ingest = orchestration.stage_task("ingest")
    validate = orchestration.stage_task("validate", retries=0)  # the same data fails the same way
    features = orchestration.stage_task("features", retries=0)

    run = prepare()
    orchestration.train_and_promote(run, features(validate(ingest(run))),
                                    orchestration.champion_asset(DEFAULTS.registry.model_name))


leanrec_train()
