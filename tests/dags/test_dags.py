"""The Airflow DAGs: they import, their structure (order, pools, queues, retries, form), and
`leanrec_train` run end to end by Airflow itself (`airflow dags test`) on tiny synthetic data."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.core.config import load_params
from pipeline.core.errors import ConfigError
from pipeline.orchestration import airflow as orchestration
from pipeline.orchestration import runs
from tests.helpers import TINY_FORM

ROOT = Path(__file__).resolve().parents[2]
DAGS = ROOT / "dags"
LAUNCHER = DAGS / "run_airflow.sh"
TRAIN_ORDER = ["prepare", "ingest", "validate", "features", "train", "evaluate", "register", "promote"]


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory) -> Path:
    """A private AIRFLOW_HOME for this process (Airflow reads its config once, at first import)."""
    home = tmp_path_factory.mktemp("airflow_home")
    settings = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "SCARF_ANALYTICS": "false",
    }
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    yield home
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _dagbag(pools: set[str] | None = None):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS), known_pools=pools or {"default_pool", orchestration.gpu_pool()})


@pytest.fixture(scope="module")
def train_dag(airflow_home):
    bag = _dagbag()
    assert bag.import_errors == {}
    return bag.dags["leanrec_train"]


def test_every_dag_file_imports_without_errors(airflow_home):
    bag = _dagbag()
    assert bag.import_errors == {}, bag.import_errors
    dag_files = {p.resolve() for p in DAGS.glob("*.py")}
    assert dag_files, "no DAG files"
    assert {Path(d.fileloc).resolve() for d in bag.dags.values()} == dag_files
    assert {"leanrec_train", "leanrec_incremental", "leanrec_recommend"} <= set(bag.dags)


def test_dags_use_only_known_pools(airflow_home):
    # DagBag warns about pools outside the known ones: this is what catches a misspelt pool.
    assert _dagbag().dag_warnings == set()
    warnings = _dagbag(pools={"default_pool"}).dag_warnings
    assert sorted(w.message for w in warnings) == [
        f"Dag '{dag_id}' references non-existent pools: ['gpu']"
        for dag_id in ("leanrec_incremental", "leanrec_recommend", "leanrec_train")]


COMPRESS_TASKS = {"compress", "compress_with_training"}


def test_train_dag_runs_the_stages_in_order(train_dag):
    chain = ["prepare", "ingest", "validate", "features", "train"]
    assert set(train_dag.task_ids) == {*TRAIN_ORDER, *COMPRESS_TASKS, "post_training_variants", "trained_variants"}
    for upstream, task_id in zip(chain, chain[1:]):
        assert train_dag.get_task(task_id).upstream_task_ids == {upstream}
    assert train_dag.get_task("prepare").upstream_task_ids == set()
    # one mapped compress task per variant, after train; evaluate waits for all of them
    assert train_dag.get_task("compress").upstream_task_ids == {"train", "post_training_variants"}
    assert train_dag.get_task("compress_with_training").upstream_task_ids == {"train", "trained_variants"}
    assert train_dag.get_task("evaluate").upstream_task_ids == {"train", *COMPRESS_TASKS}
    assert train_dag.get_task("evaluate").trigger_rule == "none_failed"  # an empty variant list skips compress
    assert train_dag.get_task("register").upstream_task_ids == {"evaluate"}
    assert train_dag.get_task("promote").upstream_task_ids == {"register"}
    assert train_dag.get_task("promote").downstream_task_ids == set()
    assert type(train_dag.timetable).__name__ == "NullTimetable"  # manual trigger only


def test_gpu_tasks_use_the_gpu_pool_and_queue_and_retries_where_they_help(train_dag):
    tasks = {t: train_dag.get_task(t) for t in TRAIN_ORDER}
    for task_id in ("train", "evaluate", "compress_with_training"):
        task = train_dag.get_task(task_id)
        assert (task.pool, task.queue) == ("gpu", "gpu")
    assert train_dag.get_task("compress").queue != "gpu"  # quantization variants run in parallel on CPU workers
    for task_id in ("prepare", "ingest", "validate", "features"):
        assert tasks[task_id].pool == "default_pool"
        assert tasks[task_id].queue != "gpu"
    for task_id in ("ingest", "train"):
        assert tasks[task_id].retries >= 2
        assert tasks[task_id].retry_exponential_backoff > 1
        assert tasks[task_id].max_retry_delay is not None
    assert tasks["validate"].retries == 0
    assert tasks["register"].retries == 0 and tasks["promote"].retries == 0  # the gate is deterministic


def test_gpu_pool_and_queue_come_from_the_environment(airflow_home, monkeypatch):
    monkeypatch.setenv("LEANREC_GPU_QUEUE", "cuda-a100")
    monkeypatch.setenv("LEANREC_GPU_POOL", "big_gpus")
    dag = _dagbag(pools={"default_pool", "big_gpus"}).dags["leanrec_train"]
    assert (dag.get_task("train").pool, dag.get_task("train").queue) == ("big_gpus", "cuda-a100")


def test_form_fields_are_typed_documented_and_default_to_params_yaml(train_dag):
    defaults = load_params(ROOT / "params.yaml")
    schema = {name: param.schema for name, param in train_dag.params.items()}
    for name, param in train_dag.params.items():
        assert param.description and param.schema.get("title"), f"{name} needs a title and a description"
    expected_types = {
        "source": "string", "data_path": ["null", "string"], "synthetic_interactions": "integer",
        "synthetic_items": "integer", "data_engine": "string", "model": "string", "preset": "string", "epochs": "integer",
        "compression_variants": "array", "promotion_metric": "string", "promotion_tolerance": "number",
        "latency_budget_ms": ["null", "number"], "allow_promotion": "boolean", "overrides": "array",
    }
    assert {name: field["type"] for name, field in schema.items()} == expected_types
    assert schema["source"]["enum"] == ["synthetic", "movielens", "file"]
    assert schema["data_engine"]["enum"] == ["pandas", "duckdb", "spark"]
    assert schema["model"]["enum"] == ["sasrec", "popularity", "bpr"]
    assert schema["preset"]["enum"] == ["small", "medium", "large"]
    assert schema["compression_variants"]["items"]["enum"] == list(runs.COMPRESSION_VARIANTS)
    assert schema["promotion_metric"]["enum"] == ["ndcg@10", "hr@10"]
    values = train_dag.params.dump()
    assert values["source"] == defaults.ingest.source
    assert values["synthetic_interactions"] == defaults.ingest.synthetic.n_interactions
    assert values["epochs"] == defaults.train.epochs
    assert values["data_engine"] == defaults.data_engine
    assert values["preset"] == defaults.train.preset
    assert values["promotion_metric"] == defaults.registry.policy.metric
    assert values["promotion_tolerance"] == defaults.registry.ndcg_tolerance
    assert values["latency_budget_ms"] == defaults.registry.policy.max_latency_p50_ms
    # The defaults are a valid run configuration.
    assert runs.effective_params(values)[0].train.epochs == defaults.train.epochs


def test_form_rejects_values_outside_the_schema(train_dag):
    from airflow.sdk.exceptions import ParamValidationError

    for name, bad in [("preset", "huge"), ("epochs", 0), ("epochs", "3"), ("compression_variants", ["zip"]),
                      ("source", "kafka"), ("data_engine", "polars"), ("overrides", ["no equals sign"]), ("promotion_metric", "full/MRR"),
                      ("promotion_tolerance", 1.0), ("promotion_tolerance", -0.1), ("latency_budget_ms", 0)]:
        with pytest.raises(ParamValidationError):
            train_dag.params.get_param(name).resolve(bad)


def test_form_choices_match_the_pipeline():
    from pipeline.compression.compress import compress_variant  # noqa: F401  (the stage the mapped tasks call)
    from pipeline.core.config import TRAINED_VARIANTS

    defaults = load_params(ROOT / "params.yaml").compress.variants
    assert set(TRAINED_VARIANTS) < set(runs.COMPRESSION_VARIANTS) and set(defaults) <= set(runs.COMPRESSION_VARIANTS)


def test_the_form_chooses_the_data_engine(train_dag):
    """The data engine (params data_engine) is a form field: a run on Spark or DuckDB is one choice away."""
    assert train_dag.params.get_param("data_engine").schema["section"] == orchestration.DATA
    for engine in ("pandas", "duckdb", "spark"):
        params, overrides = runs.effective_params({**train_dag.params.dump(), "data_engine": engine})
        assert params.data_engine == engine and f"data_engine=\"{engine}\"" in overrides


def test_the_form_says_whether_a_run_may_promote(train_dag, airflow_home):
    defaults = load_params(ROOT / "params.yaml")
    # In the promotion section, right before the free overrides, on by default (params.yaml's value).
    names = list(train_dag.params)
    assert names[names.index("latency_budget_ms") + 1] == "allow_promotion" and names[-1] == "overrides"
    assert train_dag.params.dump()["allow_promotion"] is defaults.registry.allow_promotion is True
    incremental = _dagbag().dags["leanrec_incremental"]
    assert incremental.params.get_param("allow_promotion").schema == train_dag.params.get_param("allow_promotion").schema
    # The DAG run's resolved configuration carries the switch the promote stage reads.
    for value in (True, False):
        form = {**train_dag.params.dump(), "allow_promotion": value}
        params, overrides = runs.effective_params(form)
        assert params.registry.allow_promotion is value
        assert f"registry.allow_promotion={'true' if value else 'false'}" in overrides
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError):
        train_dag.params.get_param("allow_promotion").resolve("no")


def test_a_run_that_may_not_promote_writes_it_in_its_params(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANREC_RUNS_DIR", str(tmp_path / "runs"))
    root = runs.prepare_run("smoke__1", {"allow_promotion": False}, base_params=ROOT / "params.yaml")
    assert runs.run_params(root).registry.allow_promotion is False
    assert json.loads((root / runs.RUN_INFO_FILE).read_text())["overrides"] == ["registry.allow_promotion=false"]


def test_promotion_fields_set_the_registry_policy():
    params, overrides = runs.effective_params(
        {"promotion_metric": "hr@10", "promotion_tolerance": 0.05, "latency_budget_ms": 12.5})
    assert overrides == ['registry.policy.metric="hr@10"', "registry.ndcg_tolerance=0.05",
                         "registry.policy.max_latency_p50_ms=12.5"]
    assert (params.registry.policy.metric, params.registry.ndcg_tolerance, params.registry.policy.max_latency_p50_ms) \
        == ("hr@10", 0.05, 12.5)


INCREMENTAL_CHAIN = ["prepare", "ingest", "select_new", "validate", "drift", "merge_reference", "features", "train"]


@pytest.fixture(scope="module")
def incremental_dag(airflow_home):
    return _dagbag().dags["leanrec_incremental"]


@pytest.fixture(scope="module")
def recommend_dag(airflow_home):
    return _dagbag().dags["leanrec_recommend"]


def test_incremental_dag_runs_the_stages_in_order(incremental_dag):
    dag = incremental_dag
    assert set(dag.task_ids) == {*INCREMENTAL_CHAIN, *COMPRESS_TASKS, "post_training_variants", "trained_variants",
                                 "evaluate", "register", "promote"}
    assert dag.get_task("prepare").upstream_task_ids == set()
    assert dag.get_task("ingest").upstream_task_ids == {"prepare"}
    assert dag.get_task("select_new").upstream_task_ids == {"prepare", "ingest"}
    for upstream, task_id in zip(INCREMENTAL_CHAIN[2:], INCREMENTAL_CHAIN[3:]):
        assert dag.get_task(task_id).upstream_task_ids == {upstream}
    assert dag.get_task("compress").upstream_task_ids == {"train", "post_training_variants"}
    assert dag.get_task("post_training_variants").upstream_task_ids == {"select_new"}
    assert dag.get_task("evaluate").upstream_task_ids == {"train", *COMPRESS_TASKS}
    assert dag.get_task("evaluate").trigger_rule == "none_failed"
    assert dag.get_task("register").upstream_task_ids == {"evaluate"}
    assert dag.get_task("promote").upstream_task_ids == {"register"}
    # No new data: select_new short-circuits every task after it (whatever their trigger rule).
    select_new = dag.get_task("select_new")
    assert type(select_new).__name__ == "_ShortCircuitDecoratedOperator"
    assert select_new.ignore_downstream_trigger_rules is True
    assert set(dag.task_ids) - {"prepare", "ingest", "select_new"} == {
        t.task_id for t in select_new.get_flat_relatives(upstream=False)}
    for task_id in ("train", "evaluate", "compress_with_training"):
        assert (dag.get_task(task_id).pool, dag.get_task(task_id).queue) == ("gpu", "gpu")
    for task_id in ("prepare", "ingest", "select_new", "validate", "drift", "merge_reference", "features", "compress",
                    "register", "promote"):
        assert dag.get_task(task_id).pool == "default_pool" and dag.get_task(task_id).queue != "gpu"
    for task_id in ("ingest", "train"):
        assert dag.get_task(task_id).retries >= 2 and dag.get_task(task_id).retry_exponential_backoff > 1
    for task_id in ("select_new", "validate", "drift", "merge_reference", "register", "promote"):
        assert dag.get_task(task_id).retries == 0


def test_scheduled_dags_run_without_catchup_and_one_at_a_time(incremental_dag, recommend_dag):
    # incremental: daily (a no-op when nothing arrived); recommend: when the champion moves (next test).
    assert incremental_dag.schedule == "@daily" and incremental_dag.timetable.expression == "0 0 * * *"
    for dag in (incremental_dag, recommend_dag):
        assert dag.catchup is False and dag.max_active_runs == 1


def test_recommend_runs_when_promote_moves_the_champion(train_dag, incremental_dag, recommend_dag):
    champion = orchestration.champion_asset(load_params(ROOT / "params.yaml").registry.model_name)
    # Both training DAGs' promote tasks update the champion's Asset (and no other task does) ...
    for dag in (train_dag, incremental_dag):
        assert dag.get_task("promote").outlets == [champion]
        assert [t for t in dag.task_ids if dag.get_task(t).outlets] == ["promote"]
    # ... and that Asset, alone, schedules leanrec_recommend.
    assert type(recommend_dag.timetable).__name__ == "AssetTriggeredTimetable"
    assert recommend_dag.schedule == [champion]
    assert recommend_dag.timetable.asset_condition.objects == (champion,)
    # incremental is not on it: it moves the champion itself, and a new champion brings no new data.
    assert type(incremental_dag.timetable).__name__ != "AssetTriggeredTimetable"


def test_promote_updates_the_champion_only_when_it_moved(train_dag):
    from airflow.sdk.exceptions import AirflowSkipException

    champion = orchestration.champion_asset("leanrec")
    moved = {"root": "r", "stage": "promote", "result": {"promoted": True, "decision": "promoted", "reasons": []}}
    assert orchestration.champion_moved(moved, champion) == moved
    # A successful task updates its outlets; a skipped one does not: a gate that keeps the champion skips.
    for decision in ("rejected", "unchanged", "not_allowed", "refused"):
        kept = {"root": "r", "result": {"promoted": False, "decision": decision, "reasons": ["NDCG@10 below"]}}
        with pytest.raises(AirflowSkipException, match=f"did not move \\(decision: {decision}; NDCG@10 below\\)"):
            orchestration.champion_moved(kept, champion)


def test_schedules_come_from_the_environment(airflow_home, monkeypatch):
    monkeypatch.setenv("LEANREC_INCREMENTAL_SCHEDULE", "0 3 * * *")
    monkeypatch.setenv("LEANREC_RECOMMEND_SCHEDULE", "none")
    bag = _dagbag()
    assert bag.dags["leanrec_incremental"].timetable.expression == "0 3 * * *"
    assert type(bag.dags["leanrec_recommend"].timetable).__name__ == "NullTimetable"
    assert type(bag.dags["leanrec_train"].timetable).__name__ == "NullTimetable"


def test_incremental_form_matches_the_train_form_less_the_model_shape(incremental_dag, train_dag):
    # The model and preset are the champion's (its shape must match to fine-tune it).
    assert set(incremental_dag.params) == set(train_dag.params) - {"model", "preset"}
    for name, param in incremental_dag.params.items():
        assert param.description and param.schema.get("title"), f"{name} needs a title and a description"
        assert param.schema["type"] == train_dag.params.get_param(name).schema["type"]
        assert param.schema.get("enum") == train_dag.params.get_param(name).schema.get("enum")
    assert incremental_dag.params.dump() == {k: v for k, v in train_dag.params.dump().items() if k in incremental_dag.params}


TAIL_TASKS = {"train", *COMPRESS_TASKS, "post_training_variants", "trained_variants", "evaluate", "register", "promote"}


def _task_spec(task) -> dict:
    return {"group": task.task_group.group_id, "type": type(task).__name__, "trigger_rule": task.trigger_rule,
            "pool": task.pool, "queue": task.queue, "retries": task.retries,
            "retry_exponential_backoff": task.retry_exponential_backoff, "max_retry_delay": task.max_retry_delay,
            "upstream_in_group": task.upstream_task_ids & TAIL_TASKS, "downstream": task.downstream_task_ids}


def test_train_and_incremental_dags_end_with_the_same_task_group(train_dag, incremental_dag):
    # One @task_group (pipeline.orchestration.airflow.train_and_promote), the same tasks in both DAGs,
    # with their own ids (prefix_group_id=False: no `train_and_promote.` prefix).
    for dag in (train_dag, incremental_dag):
        group = dag.task_group_dict[orchestration.TAIL_GROUP_ID]
        assert group.prefix_group_id is False
        assert {task.task_id for task in group} == TAIL_TASKS
        assert {t for t in dag.task_ids if dag.get_task(t).task_group.group_id == orchestration.TAIL_GROUP_ID} \
            == TAIL_TASKS
    assert {t: _task_spec(train_dag.get_task(t)) for t in TAIL_TASKS} \
        == {t: _task_spec(incremental_dag.get_task(t)) for t in TAIL_TASKS}
    # What enters the group: features feeds train, the run's variants (prepare's, or select_new's copy) feed
    # the two variant lists.
    assert train_dag.get_task("train").upstream_task_ids == incremental_dag.get_task("train").upstream_task_ids \
        == {"features"}
    assert train_dag.get_task("post_training_variants").upstream_task_ids == {"prepare"}
    assert incremental_dag.get_task("trained_variants").upstream_task_ids == {"select_new"}
    assert {t: train_dag.get_task(t).trigger_rule for t in TAIL_TASKS} == {
        t: "none_failed" if t == "evaluate" else "all_success" for t in TAIL_TASKS}


def test_retries_come_from_the_dags_default_args(train_dag, incremental_dag, recommend_dag):
    for dag in (train_dag, incremental_dag, recommend_dag):
        assert dag.default_args == orchestration.DEFAULT_ARGS
        # A task that sets nothing retries with the DAG's default_args (prepare: a registry or disk hiccup).
        prepare = dag.get_task("prepare")
        assert (prepare.retries, prepare.retry_delay, prepare.max_retry_delay) == (
            orchestration.DEFAULT_ARGS["retries"], orchestration.DEFAULT_ARGS["retry_delay"],
            orchestration.DEFAULT_ARGS["max_retry_delay"])
    # Every DAG shares the same settings (start date, no catchup, the project's tag).
    assert {(d.start_date, d.catchup, "leanrec" in d.tags) for d in (train_dag, incremental_dag, recommend_dag)} \
        == {(orchestration.START_DATE, False, True)}


def test_every_dag_has_an_owner_and_tags_that_say_what_it_does(train_dag, incremental_dag, recommend_dag):
    assert {d.dag_id: set(d.tags) for d in (train_dag, incremental_dag, recommend_dag)} == {
        "leanrec_train": {"leanrec", "training"},
        "leanrec_incremental": {"leanrec", "training", "incremental"},
        "leanrec_recommend": {"leanrec", "serving"},
    }
    for dag in (train_dag, incremental_dag, recommend_dag):
        assert dag.owner == orchestration.OWNER == "leanrec-ml"
        assert {dag.get_task(t).owner for t in dag.task_ids} == {orchestration.OWNER}
        assert dag.doc_md and dag.description


def test_every_task_has_documentation(train_dag, incremental_dag, recommend_dag):
    for dag in (train_dag, incremental_dag, recommend_dag):
        for task_id in dag.task_ids:
            doc = dag.get_task(task_id).doc_md
            assert doc and len(doc.split()) >= 12, f"{dag.dag_id}.{task_id} needs a doc_md saying what it does"
    # Each stage's own words, not one generic sentence.
    docs = [train_dag.get_task(t).doc_md for t in train_dag.task_ids]
    assert len(set(docs)) == len(docs)
    assert "champion Asset" in train_dag.get_task("promote").doc_md


def test_form_fields_are_grouped_in_sections_in_form_order(train_dag, incremental_dag, recommend_dag):
    def sections(dag) -> list[str]:
        return [param.schema.get("section") for param in dag.params.values()]

    o = orchestration
    assert sections(train_dag) == [o.DATA] * 5 + [o.MODEL] * 2 + [o.TRAINING, o.COMPRESSION] + [o.PROMOTION] * 4 + [o.ADVANCED]
    assert sections(incremental_dag) == [s for s in sections(train_dag) if s != o.MODEL]
    assert sections(recommend_dag) == [o.RECOMMENDATIONS, o.ADVANCED]
    # A section's fields are next to each other on the form (the UI shows each section once, in order).
    for dag in (train_dag, incremental_dag, recommend_dag):
        order = sections(dag)
        assert all(order.index(s) == i or order[i - 1] == s for i, s in enumerate(order))


def _field_spec(param) -> tuple:
    return param.schema, param.description, param.value


def test_the_training_dags_share_one_form_spec(train_dag, incremental_dag, recommend_dag):
    # The shared fields are built by one function (orchestration.training_form): the same specs, and each
    # DAG adds only its own (leanrec_train: model and preset; leanrec_incremental: none).
    shared = orchestration.training_form(load_params(ROOT / "params.yaml"))
    assert list(incremental_dag.params) == list(shared)
    assert [name for name in train_dag.params if name not in ("model", "preset")] == list(shared)
    for name, param in shared.items():
        assert _field_spec(train_dag.params.get_param(name)) == _field_spec(param), name
        assert _field_spec(incremental_dag.params.get_param(name)) == _field_spec(param), name
    # New Param objects for each DAG: a DAG's form shares the spec, never the objects, with another's.
    assert all(train_dag.params.get_param(n) is not incremental_dag.params.get_param(n) for n in shared)
    # The UI order: data, then the model, then training, compression, the policy and overrides.
    assert list(train_dag.params)[3:8] == ["synthetic_items", "data_engine", "model", "preset", "epochs"]
    assert list(train_dag.params)[-1] == "overrides"
    assert recommend_dag.params.get_param("overrides").schema == shared["overrides"].schema
    with pytest.raises(ValueError, match="already in the shared training form"):
        orchestration.training_form(load_params(ROOT / "params.yaml"), epochs=shared["epochs"])


def test_recommend_dag_structure_and_form(recommend_dag):
    dag = recommend_dag
    assert set(dag.task_ids) == {"prepare", "recommend"}
    assert dag.get_task("recommend").upstream_task_ids == {"prepare"}
    assert (dag.get_task("recommend").pool, dag.get_task("recommend").queue) == ("gpu", "gpu")
    assert dag.get_task("recommend").retries >= 2
    defaults = load_params(ROOT / "params.yaml")
    assert dag.params.dump() == {"recommendations_per_user": defaults.recommend.k, "overrides": []}
    for name, param in dag.params.items():
        assert param.description and param.schema.get("title"), f"{name} needs a title and a description"
    params, _ = runs.effective_params(dag.params.dump(), base_overrides=['recommend.histories="champion"'])
    assert (params.recommend.k, params.recommend.histories) == (defaults.recommend.k, "champion")


def test_schedule_reads_cron_presets_and_none(monkeypatch):
    monkeypatch.delenv("LEANREC_X_SCHEDULE", raising=False)
    assert orchestration.schedule("LEANREC_X_SCHEDULE") == "@daily"
    monkeypatch.setenv("LEANREC_X_SCHEDULE", " @hourly ")
    assert orchestration.schedule("LEANREC_X_SCHEDULE") == "@hourly"
    for off in ("none", "None", ""):
        monkeypatch.setenv("LEANREC_X_SCHEDULE", off)
        assert orchestration.schedule("LEANREC_X_SCHEDULE") is None
    champion = orchestration.champion_asset("leanrec")
    monkeypatch.setenv("LEANREC_X_SCHEDULE", "champion")
    assert orchestration.schedule("LEANREC_X_SCHEDULE", champion=champion) == [champion]
    with pytest.raises(ValueError, match="cannot be scheduled on the champion"):
        orchestration.schedule("LEANREC_X_SCHEDULE")
    monkeypatch.delenv("LEANREC_X_SCHEDULE")
    assert orchestration.schedule("LEANREC_X_SCHEDULE", orchestration.ON_CHAMPION, champion=champion) == [champion]


# ----------------------------------------------------------------------------- pipeline/orchestration/runs.py


def test_overrides_from_form_maps_fields_to_params_keys():
    overrides = runs.overrides_from_form(
        {"source": "movielens", "data_path": "data/ml 100k", "epochs": 3, "preset": None, "overrides": ["train.lr=0.001"]})
    assert overrides == ['ingest.source="movielens"', "train.epochs=3",
                         'ingest.movielens.path="data/ml 100k"', "train.lr=0.001"]


@pytest.mark.parametrize("form, message", [
    ({"epochs": 3, "epoch": 4}, "unknown form fields: ['epoch']"),
    ({"source": "synthetic", "data_path": "x.csv"}, "reads no path"),
    ({"overrides": "train.lr=1"}, "list of 'key=value'"),
])
def test_overrides_from_form_rejects_bad_forms(form, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        runs.overrides_from_form(form)


def test_run_key_is_a_safe_unique_directory_name():
    a, b = runs.run_key("manual__2026-01-01T00:00:00+00:00"), runs.run_key("manual__2026-01-01T00:00:00-00:00")
    assert a != b
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", a) and a.startswith("manual__2026-01-01T00_00_00")
    assert runs.run_key("../../etc").startswith("etc-")


def test_prepare_run_writes_the_effective_params_and_is_idempotent(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANREC_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("LEANREC_PROJECT_DIR", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    base = tmp_path / "params.yaml"
    base.write_text(yaml.safe_dump({"ingest": {"movielens": {"path": "data/ml-100k"}}}))
    form = {"source": "movielens", "epochs": 3, "compression_variants": ["int8"]}
    root = runs.prepare_run("manual__1", form, base_params=base)
    assert root.parent == tmp_path / "runs"
    params = runs.run_params(root)
    assert params.train.epochs == 3
    assert params.ingest.movielens.path == str(tmp_path / "data/ml-100k")  # project-relative -> absolute
    info = json.loads((root / runs.RUN_INFO_FILE).read_text())
    assert info["form"] == form and info["run_id"] == "manual__1"
    # No tracking server: the run logs to the project's store, like the CLI.
    assert (root / "mlflow.db").resolve() == tmp_path / "mlflow.db"
    assert (root / "mlartifacts").resolve() == tmp_path / "mlartifacts"
    first = (root / runs.RUN_PARAMS_FILE).read_text()
    assert runs.prepare_run("manual__1", form, base_params=base) == root
    assert (root / runs.RUN_PARAMS_FILE).read_text() == first


def test_prepare_run_leaves_a_configured_tracking_store_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANREC_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/elsewhere.db")
    root = runs.prepare_run("r", {}, base_params=ROOT / "params.yaml")
    assert not (root / "mlflow.db").exists() and not (root / "mlflow.db").is_symlink()


def test_prepare_run_names_a_bad_override(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANREC_RUNS_DIR", str(tmp_path / "runs"))
    with pytest.raises(ConfigError, match="train.epochz: unknown key"):
        runs.prepare_run("r", {"overrides": ["train.epochz=3"]}, base_params=ROOT / "params.yaml")
    assert not (tmp_path / "runs").exists()


def test_run_stage_needs_a_prepared_run(tmp_path):
    with pytest.raises(ConfigError, match="prepare step has not run"):
        runs.run_stage("ingest", tmp_path)


def test_stages_rerun_on_a_run_root_give_the_same_outputs(tmp_path, monkeypatch):
    """A retried or cleared task reruns its stage on the same root: same outputs, no leftovers."""
    monkeypatch.setenv("LEANREC_RUNS_DIR", str(tmp_path / "runs"))
    root = runs.prepare_run("manual__idempotent", TINY_FORM, base_params=ROOT / "params.yaml")
    hashes = []
    for _ in range(2):
        summaries = [runs.run_stage(stage, root) for stage in ("ingest", "validate", "features")]
        # Every data file (the reports also record timings, which differ).
        hashes.append({str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                       for p in (root / "data").rglob("*.parquet")})
    assert len(hashes[0]) >= 7 and hashes[0] == hashes[1]
    # XCom payloads: the root and small scalars only (validate's per-expectation list is left out).
    ingest, validate, features = summaries
    assert ingest["root"] == str(root) and ingest["result"]["rows_written"] > 0
    assert "expectations" not in validate["result"] and validate["result"]["rows_passed"] > 0
    assert len(json.dumps(summaries)) < 4000


def test_pipeline_errors_fail_the_task_without_retries(train_dag, tmp_path):
    from airflow.sdk.exceptions import AirflowFailException

    # The DAG's own ingest task (its callable, as the task runner calls it), not a copy of it.
    with pytest.raises(AirflowFailException, match="ingest failed: .*prepare step has not run"):
        train_dag.get_task("ingest").python_callable({"root": str(tmp_path)})
    with pytest.raises(AirflowFailException, match="ingest failed: .*prepare step has not run"):
        orchestration.task_stage("ingest", str(tmp_path))


def test_choices_reads_literal_keys():
    assert runs.choices("train.preset") == ["small", "medium", "large"]
    assert runs.choices("features.split.strategy") == ["leave_one_out", "temporal"]
    with pytest.raises(ConfigError):
        runs.choices("train.epochs")


def test_launcher_refuses_all_admins_mode_off_loopback(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "AIRFLOW_HOME": str(tmp_path), "LEANREC_AIRFLOW_ALL_ADMINS": "true", "LEANREC_AIRFLOW_HOST": "0.0.0.0"}
    proc = subprocess.run([str(LAUNCHER), "version"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "loopback only" in proc.stderr


# ----------------------------------------------------------------------------- through Airflow itself


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory) -> dict[str, str]:
    """Environment for `dags/run_airflow.sh` on a migrated temporary AIRFLOW_HOME with its gpu pool."""
    home = tmp_path_factory.mktemp("airflow_cli")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "LEANREC_"))},
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "AIRFLOW_HOME": str(home),
        "LEANREC_RUNS_DIR": str(home / "runs"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db",
        "GX_ANALYTICS_ENABLED": "false",
    }
    proc = subprocess.run([str(LAUNCHER), "setup"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return env


def _client(env: dict):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])


def _dags_test(env: dict, form: dict, dag_id: str = "leanrec_train") -> tuple[subprocess.CompletedProcess, str, Path, str]:
    proc = subprocess.run([str(LAUNCHER), "dags", "test", dag_id, "-c", json.dumps(form)],
                          env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    found = re.search(rf"DagRun Finished: dag_id={dag_id}, .*?run_id=(\S+?), .*?state=(\w+)", output)
    assert found, output[-5000:]
    return proc, found.group(2), Path(env["LEANREC_RUNS_DIR"]) / runs.run_key(found.group(1)), found.group(1)


def _task_states(env: dict, run_id: str, dag_id: str = "leanrec_train") -> dict[str, str]:
    proc = subprocess.run([str(LAUNCHER), "tasks", "states-for-dag-run", dag_id, run_id, "-o", "json"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(proc.stdout[proc.stdout.index("["):])
    return {row["task_id"]: row["state"] for row in rows}


@pytest.mark.slow
def test_train_dag_runs_end_to_end_through_airflow(cli_env):
    proc, state, root, run_id = _dags_test(cli_env, TINY_FORM)
    assert (proc.returncode, state) == (0, "success"), (proc.stdout + proc.stderr)[-5000:]
    states = _task_states(cli_env, run_id)
    assert states == {t: "success" for t in [*TRAIN_ORDER, *COMPRESS_TASKS, "post_training_variants", "trained_variants"]}
    params = runs.run_params(root)
    assert (params.train.epochs, params.ingest.synthetic.n_interactions, params.train.d_model) == (2, 6000, 16)
    assert (root / "models" / "main" / "model.safetensors").exists()
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    assert set(metrics["models"]) == {"sasrec", "popularity", "bpr"}
    assert {"full/NDCG@10", "full/HR@10"} <= set(metrics["models"]["sasrec"])
    # both mapped compress groups ran and evaluate measured exactly the chosen variants
    compression = json.loads((root / "reports" / "compression.json").read_text())
    assert set(compression["models"]) == {"teacher", "int8", "distilled"}
    assert (root / "models" / "main" / "variants" / "distilled" / "variant.json").exists()
    # Tracked in the temporary MLflow store, not the project's.
    with sqlite3.connect(Path(cli_env["AIRFLOW_HOME"]) / "mlflow.db") as db:
        names = {row[0] for row in db.execute("select name from runs where status = 'FINISHED'")}
    assert names, "no finished MLflow run in the temporary store"
    assert not (root / "mlflow.db").exists()
    # register -> promote: the first champion, in the temporary MLflow store.
    promotion = json.loads((root / "reports" / "promotion.json").read_text())
    assert (promotion["decision"], promotion["champion_version"]) == ("promoted", None), promotion
    champion = _client(cli_env).get_model_version_by_alias("leanrec", "champion")
    assert str(champion.version) == promotion["challenger_version"]
    assert champion.tags["leanrec.variant"] in compression["models"]


@pytest.mark.slow
def test_failed_validation_fails_its_task_with_the_gx_summary_and_stops_before_train(cli_env):
    form = {**TINY_FORM, "overrides": [*TINY_FORM["overrides"], "validate.min_rows=1000000"]}
    proc, state, root, run_id = _dags_test(cli_env, form)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and state == "failed"
    assert "Great Expectations validation failed" in output
    assert "expect_table_row_count_to_be_between failed: 6000 rows < validate.min_rows 1000000" in output
    states = _task_states(cli_env, run_id)
    assert states["validate"] == "failed"
    assert {states[t] for t in ("features", "train", "evaluate")} == {"upstream_failed"}
    assert not (root / "models").exists()
    assert output.count("[DAG TEST] running task <TaskInstance: leanrec_train.validate") == 1  # no retry


def _versions(env: dict) -> list[str]:
    return sorted(str(v.version) for v in _client(env).search_model_versions("name='leanrec'"))


def _vocab(root: Path, name: str) -> dict:
    import pandas as pd

    frame = pd.read_parquet(root / "data" / "features" / name)
    return dict(zip(frame["id"].tolist(), frame["index"].tolist(), strict=True))


@pytest.mark.slow
def test_incremental_and_recommend_dags_through_airflow(cli_env, tmp_path):
    """No champion: recommend is a skipped no-op. Then train -> incremental with no new data (a
    no-op) -> incremental with new users and items (vocabularies grow, the gate decides) ->
    recommendations with the champion, each a DAG run of `airflow dags test` on tiny data."""
    env = {**cli_env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "LEANREC_RUNS_DIR": str(tmp_path / "runs")}

    proc, state, root, run_id = _dags_test(env, {}, "leanrec_recommend")
    assert (proc.returncode, state) == (0, "success"), (proc.stdout + proc.stderr)[-5000:]
    assert "no champion in the registry yet" in proc.stdout + proc.stderr
    assert _task_states(env, run_id, "leanrec_recommend") == {"prepare": "skipped", "recommend": "skipped"}
    assert not (root / "data" / "recommendations").exists()

    form = {**TINY_FORM, "compression_variants": ["int8"]}
    proc, state, train_root, _ = _dags_test(env, form)
    assert (proc.returncode, state) == (0, "success"), (proc.stdout + proc.stderr)[-5000:]
    assert _versions(env) == ["1"]

    # Same source and seed: nothing new. select_new short-circuits everything after it.
    proc, state, root, run_id = _dags_test(env, form, "leanrec_incremental")
    assert (proc.returncode, state) == (0, "success"), (proc.stdout + proc.stderr)[-5000:]
    states = _task_states(env, run_id, "leanrec_incremental")
    assert {t: states.pop(t) for t in ("prepare", "ingest", "select_new")} == dict.fromkeys(
        ("prepare", "ingest", "select_new"), "success")
    assert set(states.values()) == {"skipped"} and {"train", "register", "promote"} <= set(states)
    assert json.loads((root / "reports" / "incremental.json").read_text())["rows_new"] == 0
    assert _versions(env) == ["1"]  # no new model version

    # Another seed, more interactions and items: new users and items on top of the champion's data.
    new_data = {**form, "synthetic_interactions": 8000, "synthetic_items": 200,
                "overrides": [*form["overrides"], "seed=7", "drift.action=warn"]}
    proc, state, root, run_id = _dags_test(env, new_data, "leanrec_incremental")
    assert (proc.returncode, state) == (0, "success"), (proc.stdout + proc.stderr)[-5000:]
    assert set(_task_states(env, run_id, "leanrec_incremental").values()) == {"success", "skipped"}
    lineage = json.loads((root / "champion_lineage.json").read_text())
    assert (lineage["version"], lineage["workdir"]) == ("1", str(train_root))
    params = runs.run_params(root)
    assert params.train.init_from == str(train_root / "models" / "main")
    assert params.features.vocab_from == str(train_root / "data" / "features")
    assert (root / "reports" / "drift.json").exists()
    old_items, new_items = _vocab(train_root, "item_vocab.parquet"), _vocab(root, "item_vocab.parquet")
    assert len(new_items) > len(old_items) and {i: new_items[i] for i in old_items} == old_items
    old_users, new_users = _vocab(train_root, "user_vocab.parquet"), _vocab(root, "user_vocab.parquet")
    assert len(new_users) > len(old_users) and {u: new_users[u] for u in old_users} == old_users
    assert "warm start from" in proc.stdout + proc.stderr
    promotion = json.loads((root / "reports" / "promotion.json").read_text())
    assert (promotion["challenger_version"], promotion["champion_version"]) == ("2", "1")
    assert promotion["decision"] in ("promoted", "rejected") and promotion["champion"] is not None
    champion = str(_client(env).get_model_version_by_alias("leanrec", "champion").version)
    assert champion == ("2" if promotion["decision"] == "promoted" else "1")
    assert _versions(env) == ["1", "2"]

    proc, state, root, run_id = _dags_test(env, {"recommendations_per_user": 5}, "leanrec_recommend")
    assert (proc.returncode, state) == (0, "success"), (proc.stdout + proc.stderr)[-5000:]
    report = json.loads((root / "reports" / "recommend.json").read_text())
    assert (report["version"], report["histories"], report["k"]) == (champion, "champion", 5)
    import pandas as pd

    recommendations = pd.read_parquet(root / "data" / "recommendations" / "recommendations.parquet")
    assert recommendations["user_id"].nunique() == report["users"] > 0
    assert set(recommendations["user_id"]) <= set(old_users if champion == "1" else new_users)
    assert len(recommendations) == report["rows"] == 5 * report["users"]
