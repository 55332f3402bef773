"""DAG `leanrec_recommend`: batch recommendations with the current champion (scheduled).

Wiring only. `prepare` makes the DAG run's work directory and looks up the registry's `champion`;
`recommend` runs the recommend stage there with `recommend.histories=champion`: the users and
histories are those registered with the champion (the servable model's own data), so the run needs
the MLflow registry only, and its output is what the served model answers for those users:

    prepare -> recommend   ->  <run dir>/data/recommendations/recommendations.parquet

No champion yet (nothing trained and promoted): `prepare` logs it and skips the run, which ends
successful with nothing written, so a fresh deployment is not failing every day.

Schedule: the champion's Asset (`leanrec_champion_<registry.model_name>`): a run each time a
training DAG's `promote` moves the champion. With the champion's own users and histories the
recommendations change only then, so a daily run would write the same file again.
`$LEANREC_RECOMMEND_SCHEDULE` sets another (a cron or preset such as @daily; `none`: manual only;
default `champion`), no catchup.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.sdk import Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from pipeline.core.config import load_params
from pipeline.core.errors import PipelineError
from pipeline.orchestration import airflow as orchestration
from pipeline.orchestration import runs

logger = logging.getLogger(__name__)
DEFAULTS = load_params(runs.params_path())


@dag(**orchestration.dag_settings(
    dag_id="leanrec_recommend",
    tags=("serving",),
    description="Top-K recommendations for every known user with the registry's champion",
    schedule=orchestration.schedule("LEANREC_RECOMMEND_SCHEDULE", orchestration.ON_CHAMPION,
                                    champion=orchestration.champion_asset(DEFAULTS.registry.model_name)),
    max_active_runs=1,
    doc_md=__doc__,
    params={
        "recommendations_per_user": Param(
            DEFAULTS.recommend.k, type="integer", minimum=1, maximum=1_000, title="Recommendations per user",
            section=orchestration.RECOMMENDATIONS,
            description="Items recommended to each known user (recommend.k), best first, never one already seen.",
        ),
        "overrides": orchestration.overrides_field("recommend.device=cpu"),
    },
))
def leanrec_recommend() -> None:
    @task
    def prepare() -> dict[str, Any]:
        """Makes the DAG run's work directory (recommend.histories=champion) and looks up the registry's
        champion. No champion yet: skips the run, which ends successful with nothing written."""
        context = get_current_context()
        try:
            root = runs.prepare_run(context["run_id"], dict(context["params"]),
                                    base_overrides=['recommend.histories="champion"'])
            version = runs.champion_version(root)
        except PipelineError as err:
            raise AirflowFailException(f"invalid run parameters: {err}") from err
        if version is None:
            logger.warning("no champion in the registry yet: nothing to recommend with (train and promote one "
                           "with the DAG leanrec_train); skipping this run")
            raise AirflowSkipException("no champion yet")
        logger.info("recommending with champion version %s", version)
        return {"root": str(root), "champion_version": version}

    recommend = orchestration.stage_task("recommend", **orchestration.gpu_task_args())

    recommend(prepare())


leanrec_recommend()
