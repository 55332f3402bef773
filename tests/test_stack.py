"""The production-like stack, started for real: docker-compose.yml brought up by `.ci/stack.sh up`
(stand-in base images where no registry serves them), `leanrec_train` triggered through the
api-server's REST API with the UI form's payload, its tasks run by the Celery workers (the `gpu`
queue by airflow-worker-gpu-on-cpu where there is no GPU), MLflow on Postgres, artifacts in the
object store, the champion served by the model-server container, `dvc push -r stack` to the bucket.

Uses a running stack when LEANREC_STACK_UP=1 (`.ci/stack.sh test` sets it), else runs
`.ci/stack.sh up` itself and `down` at the end (LEANREC_STACK_KEEP=1 keeps it). Skips, saying why,
where no Docker engine can run. Cost on a clean 2-core machine: README (The production-like stack).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests

from tests.dags.test_dags import TRAIN_ORDER
from tests.helpers import TINY_FORM

pytestmark = [pytest.mark.slow, pytest.mark.stack, pytest.mark.timeout(5400)]

ROOT = Path(__file__).resolve().parents[1]
STACK = ROOT / ".ci" / "stack.sh"
CACHE = ROOT / ".stack-cache"
DAG = "leanrec_train"
# The tests' tiny form with a latency budget for a shared CI host: params.yaml's 50 ms p50 is a serving policy for
# real hardware. On the 2-core host here at load average 9-25 the tiny models measured 58-104 ms p50, and register
# failed with "no model meets the registry policy" (2026-12-03, kept by the evidence below). The stack test checks
# the wiring, not the speed: the budget's own logic is tested in tests/registry.
STACK_FORM = {**TINY_FORM, "latency_budget_ms": 60_000.0}


def _engine_unavailable() -> str | None:
    """Why no Docker engine can run here, or None."""
    if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0:
        return None
    if os.geteuid() != 0:
        return "no Docker engine answers and this is not root, so dockerd cannot be started"
    if not (shutil.which("dockerd") or shutil.which("apt-get")):
        return "no dockerd and no apt-get to install docker.io"
    return None


class Stack:
    def __init__(self) -> None:
        env_file = Path(os.environ.get("LEANREC_STACK_ENV", CACHE / "stack.env"))
        self.env = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line and not line.startswith("#"))
        self.airflow = f"http://127.0.0.1:{self.env['AIRFLOW_PORT']}"
        self.mlflow = f"http://127.0.0.1:{self.env['MLFLOW_PORT']}"
        self.s3 = f"http://127.0.0.1:{self.env['MINIO_PORT']}"
        self.model_server = f"http://127.0.0.1:{self.env['MODEL_SERVER_PORT']}"
        self._token = ""

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([str(STACK), "compose", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)

    def container(self, service: str) -> str:
        ids = self.compose("ps", "-q", service).stdout.split()
        assert ids, f"no container for {service}"
        return ids[0]

    def logs(self, *services: str) -> str:
        return self.compose("logs", "--tail", "60", *services).stdout[-6000:]

    def token(self) -> str:
        """The admin's API token (cached: each one costs a `docker exec`, and the fault checks poll)."""
        if self._token:
            return self._token
        passwords = subprocess.run(["docker", "exec", self.container("airflow-apiserver"), "cat",
                                    "/opt/airflow/simple_auth_manager_passwords.json.generated"],
                                   capture_output=True, text=True, timeout=60, check=True).stdout
        response = requests.post(f"{self.airflow}/auth/token", json={"username": "admin", "password": json.loads(passwords)["admin"]},
                                 timeout=30)
        response.raise_for_status()
        self._token = response.json()["access_token"]
        return self._token

    def api(self, method: str, path: str, headers: dict | None = None, **kwargs) -> requests.Response:
        def call() -> requests.Response:
            return requests.request(method, f"{self.airflow}/api/v2{path}", timeout=30, **kwargs,
                                    headers={"Authorization": f"Bearer {self.token()}", **(headers or {})})

        response = call()
        if response.status_code == 401:  # expired: a new token once
            self._token = ""
            response = call()
        return response

    def mlflow_client(self, user: str, password_variable: str):
        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = user, self.env[password_variable]
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.mlflow, registry_uri=self.mlflow)

    def s3_keys(self, prefix: str) -> list[str]:
        import botocore.session  # botocore: what the project's environment has (dvc-s3), boto3 is not in it

        s3 = botocore.session.get_session().create_client("s3", endpoint_url=self.s3, aws_access_key_id=self.env["MINIO_DVC_ACCESS_KEY"],
                          aws_secret_access_key=self.env["MINIO_DVC_SECRET_KEY"], region_name="us-east-1")
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=self.env["MINIO_BUCKET"], Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]


def _keep_evidence(label: str) -> None:
    """`.ci/stack.sh evidence`: the services' logs and the Airflow task logs into .stack-cache/evidence/, before a
    `down -v` removes them (the first clean run's `promote` failure could not be explained: they were gone)."""
    done = subprocess.run([str(STACK), "evidence", label], capture_output=True, text=True, timeout=600, cwd=ROOT)
    print(done.stderr[-2000:])  # noqa: T201 - pytest -rs shows it with the failure (where the evidence is)


@pytest.fixture(scope="module")
def stack(request):
    if os.environ.get("LEANREC_STACK") != "1":
        pytest.skip("the stack test runs with LEANREC_STACK=1 (the stack step of `.ci/run`, after the suite, sets it): "
                    "its image builds, `up`, DAG runs and fault checks took 25 min cold on a quiet 2-core machine (README)")
    reason = _engine_unavailable()
    if reason:
        pytest.skip(f"the stack needs a Docker engine: {reason}")
    started = os.environ.get("LEANREC_STACK_UP") != "1"
    if started:
        up = subprocess.run([str(STACK), "up"], capture_output=True, text=True, timeout=4800, cwd=ROOT)
        if up.returncode == 3:  # stack.sh: no engine answers and dockerd could not be started
            pytest.skip(f"dockerd cannot run here: {up.stderr[-800:]}")
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-6000:]
    failed_before = request.session.testsfailed
    try:
        yield Stack()
    finally:
        if request.session.testsfailed > failed_before:
            _keep_evidence("test-failed")
        if started and os.environ.get("LEANREC_STACK_KEEP") != "1":
            subprocess.run([str(STACK), "down"], capture_output=True, text=True, timeout=600, cwd=ROOT)


def _trigger(stack: Stack, edits: dict) -> str:
    deadline = time.monotonic() + 300
    while (details := stack.api("GET", f"/dags/{DAG}/details")).status_code != 200:
        assert time.monotonic() < deadline, f"{DAG} never appeared: {details.text}\n{stack.logs('airflow-dag-processor')}"
        time.sleep(3)
    assert stack.api("PATCH", f"/dags/{DAG}", json={"is_paused": False}).status_code == 200
    # The UI trigger form's body (tests/dags/test_airflow_e2e.py): every field, the logical date, empty optionals.
    conf = {name: spec["value"] for name, spec in details.json()["params"].items()} | edits
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    payload = {"conf": conf, "data_interval_end": None, "data_interval_start": None,
               "logical_date": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"), "partition_key": None}
    response = stack.api("POST", f"/dags/{DAG}/dagRuns", json=payload)
    assert response.status_code == 200, response.text
    return response.json()["dag_run_id"]


def _task_instances(stack: Stack, run_id: str) -> list[dict]:
    return stack.api("GET", f"/dags/{DAG}/dagRuns/{run_id}/taskInstances").json()["task_instances"]


def _wait_for_run(stack: Stack, run_id: str, timeout: float) -> tuple[str, dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = stack.api("GET", f"/dags/{DAG}/dagRuns/{run_id}").json()["state"]
        if state in ("success", "failed"):
            break
        time.sleep(5)
    instances = _task_instances(stack, run_id)
    return state, {t["task_id"]: t for t in instances}


def _task_log(stack: Stack, run_id: str, task: str, attempt: int) -> str:
    """One try's log as text. Airflow 3.3's log endpoint answers JSON only (Accept: text/plain got a 4xx, "Only
    application/json or application/x-ndjson is supported", so the failed run's logs were never shown)."""
    response = stack.api("GET", f"/dags/{DAG}/dagRuns/{run_id}/taskInstances/{task}/logs/{attempt}",
                         params={"full_content": "true"}, headers={"Accept": "application/json"})
    try:
        content = response.json()["content"]
    except (ValueError, KeyError, TypeError):
        return response.text
    if isinstance(content, str):
        return content
    return "\n".join(item if isinstance(item, str) else json.dumps(item) for item in content)


def _failed_logs(stack: Stack, run_id: str, tasks: dict) -> str:
    """The end of each failed task's log (the volumes go with `down -v`, so a failure must carry them); every
    try's full log is also written to .stack-cache/evidence/failed-tasks.txt, which CI's stack step prints."""
    out, full = [], []
    for name, t in tasks.items():
        if t["state"] == "failed":
            for attempt in range(1, t["try_number"] + 1):
                text = _task_log(stack, run_id, name, attempt)
                full.append(f"===== {run_id} {name} try {attempt}/{t['try_number']} ({t['hostname']})\n{text}")
            out.append(f"--- {name} (try {t['try_number']}): {text[-3000:]}")
    if full:
        (CACHE / "evidence").mkdir(parents=True, exist_ok=True)
        with open(CACHE / "evidence" / "failed-tasks.txt", "a", encoding="utf-8") as kept:
            kept.write("\n".join(full) + "\n")
    return "\n".join(out)


def _record(line: str) -> None:
    with open(CACHE / "timings.txt", "a", encoding="utf-8") as out:
        out.write(line + "\n")


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(3)
    pytest.fail(f"{url} did not answer within {timeout} s")


def test_leanrec_train_runs_on_the_celery_workers_and_its_champion_is_served(stack):
    assert requests.get(f"{stack.airflow}/api/v2/dags/{DAG}", timeout=30).status_code == 401  # auth is on
    start = time.monotonic()
    run_id = _trigger(stack, STACK_FORM)
    state, tasks = _wait_for_run(stack, run_id, timeout=2400)
    _record(f"leanrec_train DAG run (TINY_FORM, through Celery): {time.monotonic() - start:.0f} s")
    summary = {name: (t["state"], t["queue"], t["hostname"]) for name, t in tasks.items()}
    assert state == "success", f"{state}: {summary}\n{_failed_logs(stack, run_id, tasks)}"
    # TINY_FORM's variants: int8 (post-training, CPU) and distilled (trained: compress_with_training, gpu queue).
    # promote is a gate: skipped when an earlier run's champion stays (a rerun against a running stack).
    states = {name: s[0] for name, s in summary.items()}
    assert states.pop("promote") in ("success", "skipped")
    assert states == {t: "success" for t in [*TRAIN_ORDER[:-1], "compress", "post_training_variants", "trained_variants",
                                             "compress_with_training"]}
    # The gpu queue's tasks ran on the gpu queue's worker, the rest on the CPU worker (container id = hostname).
    gpu_worker = stack.container("airflow-worker-gpu-on-cpu")[:12]
    cpu_worker = stack.container("airflow-worker-cpu")[:12]
    for task in ("train", "evaluate", "compress_with_training"):
        assert summary[task][1:] == ("gpu", gpu_worker), summary
    assert summary["ingest"][1:] == ("default", cpu_worker) and summary["register"][1:] == ("default", cpu_worker)

    # MLflow (on Postgres) has the run and its child runs; the registry has a champion.
    client = stack.mlflow_client("leanrec-reader", "MLFLOW_READER_PASSWORD")
    experiment = client.get_experiment_by_name("leanrec")
    runs = client.search_runs([experiment.experiment_id], max_results=200)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert children and {c.data.tags["mlflow.parentRunId"] for c in children} <= {r.info.run_id for r in runs}
    champion = client.get_model_version_by_alias(stack.env["REGISTERED_MODEL"], "champion")
    assert champion.status == "READY"
    # Its artifacts are in the object store (the MLflow server proxies them to s3://bucket/mlflow/).
    keys = stack.s3_keys("mlflow/")
    assert any(k.endswith("MLmodel") for k in keys), keys[:20]

    # The model server loads the champion (it restarted until one existed; restart it now to load it).
    assert stack.compose("restart", "model-server").returncode == 0
    _wait_http(f"{stack.model_server}/ping", timeout=600)
    response = requests.post(f"{stack.model_server}/invocations", json={"dataframe_records": [{"history": [1, 2, 3], "k": 3}]},
                             timeout=60)
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"][0]["items"]) == 3


def test_dvc_push_to_the_stack_remote_stores_outputs_in_the_bucket(stack, tmp_path):
    """The repo's `stack` remote (.dvc/config), with the endpoint on this stack's port and DVC's own keys."""
    dvc = shutil.which("dvc") or pytest.skip("needs dvc (the project's environment)")
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": stack.env["MINIO_DVC_ACCESS_KEY"],
           "AWS_SECRET_ACCESS_KEY": stack.env["MINIO_DVC_SECRET_KEY"]}

    def run(*args: str) -> None:
        done = subprocess.run(list(args), cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr

    run("git", "init", "-q")
    run(dvc, "init", "-q")
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    run(dvc, "remote", "modify", "--local", "stack", "endpointurl", stack.s3)
    output = repo / "data" / "interactions.csv"
    output.parent.mkdir()
    output.write_text("user_id,item_id,timestamp\n" + "".join(f"{i % 7},{i % 11},{i}\n" for i in range(200)))
    run(dvc, "add", "data/interactions.csv")
    md5 = (repo / "data" / "interactions.csv.dvc").read_text().split("md5: ")[1].split()[0]
    before = set(stack.s3_keys("dvc/"))
    run(dvc, "push", "-r", "stack")
    stored = set(stack.s3_keys("dvc/")) - before | {k for k in before if md5[2:] in k}
    assert any(key.endswith(md5[2:]) for key in stored), stored


# ----------------------------------------------------------------------------- fault checks on the running stack

# They kill, restart and stop services of the running stack: run with the rest of this module (CI's stack
# step sets LEANREC_STACK_FAULTS=1); LEANREC_STACK_FAULTS=0 leaves them out, for a local stack one keeps using.
faults = pytest.mark.skipif(os.environ.get("LEANREC_STACK_FAULTS") == "0",
                            reason="LEANREC_STACK_FAULTS=0: the fault checks are left out")

def _wait_for_task(stack: Stack, run_id: str, task_ids: tuple[str, ...], timeout: float) -> str:
    """The first of task_ids seen running (polled twice a second), for a fault injected mid-task."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        instances = _task_instances(stack, run_id)
        running = [t["task_id"] for t in instances if t["state"] == "running" and t["task_id"] in task_ids]
        if running:
            return running[0]
        time.sleep(0.5)
    pytest.fail(f"none of {task_ids} ran within {timeout} s: {[(t['task_id'], t['state']) for t in instances]}")


# The tasks airflow-worker-cpu runs (the default queue; train and the trained variants go to the gpu queue).
CPU_QUEUE_TASKS = ("ingest", "validate", "features", "compress", "evaluate", "register")


def _task_instance(stack: Stack, run_id: str, task_id: str) -> dict:
    return next(t for t in _task_instances(stack, run_id) if t["task_id"] == task_id)


def _registry_is_whole(stack: Stack) -> dict:
    """Every registered version is READY with its model files in the store; returns the champion."""
    client = stack.mlflow_client("leanrec-reader", "MLFLOW_READER_PASSWORD")
    name = stack.env["REGISTERED_MODEL"]
    versions = client.search_model_versions(f"name = '{name}'")
    assert versions and all(v.status == "READY" for v in versions), [(v.version, v.status) for v in versions]
    for version in versions:
        assert client.get_run(version.run_id).info.status == "FINISHED", (version.version, version.run_id)
    champion = client.get_model_version_by_alias(name, "champion")
    return {"version": champion.version, "versions": len(versions)}


def _wait_healthy(stack: Stack, timeout: float = 900) -> None:
    done = subprocess.run([str(STACK), "wait"], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "LEANREC_STACK_TIMEOUT": str(int(timeout - 30))})
    assert done.returncode == 0, done.stderr[-4000:]


@faults
def test_killing_the_cpu_worker_mid_task_retries_it_and_registers_nothing_half_written(stack):
    before = _registry_is_whole(stack)
    run_id = _trigger(stack, STACK_FORM)
    worker = stack.container("airflow-worker-cpu")
    # The tiny run's tasks take seconds, so one may end between being seen running and the kill: that
    # kill hit no task (the try stays 1, a success), and the next task of the worker's queue is tried.
    for _ in range(4):
        task = _wait_for_task(stack, run_id, CPU_QUEUE_TASKS, timeout=1500)
        subprocess.run(["docker", "kill", worker], check=True, capture_output=True, timeout=60)
        hit = _task_instance(stack, run_id, task)["state"] != "success"
        _record(f"fault: killed airflow-worker-cpu during {task}" + ("" if hit else f" ({task} had just ended: again)"))
        time.sleep(10)
        running = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", worker], capture_output=True, text=True)
        if running.stdout.strip() != "true":
            stack.compose("start", "airflow-worker-cpu")  # `docker kill` counts as a manual stop for `unless-stopped`
        _wait_healthy(stack)
        if hit:
            break
    else:
        pytest.fail(f"four kills of airflow-worker-cpu each came just after its task ended (last: {task})")
    state, tasks = _wait_for_run(stack, run_id, timeout=2400)
    killed = tasks[task]
    # The policy: `task` has retries (DEFAULT_ARGS), so the killed try is followed by another one.
    assert killed["try_number"] >= 2, killed
    _record(f"fault: run after the kill ended {state}; {task} try {killed['try_number']} {killed['state']}")
    if state != "success":  # failed per policy: a new run completes
        _failed_logs(stack, run_id, tasks)  # kept (evidence/failed-tasks.txt): a failure per policy, still worth reading
        run_id = _trigger(stack, STACK_FORM)
        state, tasks = _wait_for_run(stack, run_id, timeout=2400)
    assert state == "success", f"{state}: {_failed_logs(stack, run_id, tasks)}"
    after = _registry_is_whole(stack)
    assert after["versions"] >= before["versions"]


@faults
def test_restarting_mlflow_during_a_run_keeps_the_champion(stack):
    champion = _registry_is_whole(stack)["version"]
    run_id = _trigger(stack, STACK_FORM)
    task = _wait_for_task(stack, run_id, ("train", "evaluate", "register"), timeout=1500)
    assert stack.compose("restart", "mlflow").returncode == 0
    _record(f"fault: restarted mlflow during {task}")
    state, tasks = _wait_for_run(stack, run_id, timeout=2400)
    summary = {name: (t["state"], t["try_number"]) for name, t in tasks.items()}
    _record(f"fault: run across the MLflow restart ended {state}: {summary}")
    if state != "success":  # it failed clearly (a failed task, not a hung run) and the registry is whole
        _failed_logs(stack, run_id, tasks)
        assert any(s == "failed" for s, _ in summary.values()), summary
    after = _registry_is_whole(stack)
    assert after["version"] == champion or state == "success", (champion, after)


@faults
def test_stopping_and_starting_postgres_every_service_recovers(stack):
    assert stack.compose("stop", "postgres").returncode == 0
    time.sleep(30)
    assert stack.compose("start", "postgres").returncode == 0
    start = time.monotonic()
    _wait_healthy(stack)
    _record(f"fault: after postgres stop (30 s) + start, every service healthy again in {time.monotonic() - start:.0f} s")
    health = requests.get(f"{stack.airflow}/api/v2/monitor/health", timeout=30).json()
    assert health["metadatabase"]["status"] == "healthy", health
    _registry_is_whole(stack)  # MLflow reads the registry again
    run_id = _trigger(stack, STACK_FORM)
    state, tasks = _wait_for_run(stack, run_id, timeout=2400)
    assert state == "success", f"{state}: {_failed_logs(stack, run_id, tasks)}"
