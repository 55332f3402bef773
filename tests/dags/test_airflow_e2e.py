"""End to end through a real Airflow: api-server, scheduler and dag-processor on loopback (SQLite,
temporary AIRFLOW_HOME, started by `dags/run_airflow.sh` as a person would), `leanrec_train`
triggered through the REST API with a JWT from `/auth/token` and the payload the UI's trigger form
sends, and a screenshot of that form in headless Chromium."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from pipeline.orchestration import runs
from tests.browser import Browser, find_chromium, keep_as_test_artifact
from tests.dags.test_dags import TRAIN_ORDER
from tests.helpers import TINY_FORM

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "dags" / "run_airflow.sh"
COMPONENTS = ("api-server", "scheduler", "dag-processor")
DAG = "leanrec_train"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each component's process group (it was started in its own session), then SIGKILL."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        try:  # children (task runners, gunicorn/uvicorn workers) go with the group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


class Airflow:
    def __init__(self, home: Path, port: int) -> None:
        self.home, self.base = home, f"http://127.0.0.1:{port}"

    def log_tails(self) -> str:
        return "\n".join(f"--- {c}.log\n" + (self.home / f"{c}.log").read_text(errors="replace")[-3000:] for c in COMPONENTS)

    def token(self) -> str:
        """A JWT from the simple auth manager, for the user whose password Airflow generated."""
        passwords = json.loads((self.home / "simple_auth_manager_passwords.json.generated").read_text())
        response = requests.post(f"{self.base}/auth/token", json={"username": "admin", "password": passwords["admin"]}, timeout=30)
        response.raise_for_status()
        return response.json()["access_token"]


@pytest.fixture(scope="module")
def airflow(tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow_live")
    port = _free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "LEANREC_"))},
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "AIRFLOW_HOME": str(home),
        "LEANREC_AIRFLOW_PORT": str(port),
        "LEANREC_RUNS_DIR": str(home / "runs"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db",
        "GX_ANALYTICS_ENABLED": "false",
        # Quick pick-up of the DAG file and of new runs on a small machine.
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
        "AIRFLOW__CORE__PARALLELISM": "2",
    }
    setup = subprocess.run([str(LAUNCHER), "setup"], env=env, capture_output=True, text=True, timeout=300)
    assert setup.returncode == 0, setup.stdout + setup.stderr
    procs: list[subprocess.Popen] = []
    server = Airflow(home, port)
    try:
        for component in COMPONENTS:
            args = [str(LAUNCHER), component] + (["--workers", "1"] if component == "api-server" else [])
            with open(home / f"{component}.log", "w") as log:
                procs.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + 240
        health: dict = {}
        while time.monotonic() < deadline:
            dead = [c for c, p in zip(COMPONENTS, procs) if p.poll() is not None]
            assert not dead, f"{dead} exited:\n{server.log_tails()}"
            try:
                health = requests.get(f"{server.base}/api/v2/monitor/health", timeout=5).json()
            except (requests.RequestException, ValueError):
                health = {}
            if all(health.get(c, {}).get("status") == "healthy" for c in ("metadatabase", "scheduler", "dag_processor")):
                break
            time.sleep(2)
        else:
            pytest.fail(f"Airflow did not become healthy ({health}):\n{server.log_tails()}")
        yield server
    finally:
        _stop(procs)


def _api(airflow: Airflow, token: str, method: str, path: str, **kwargs) -> requests.Response:
    return requests.request(method, f"{airflow.base}/api/v2{path}", headers={"Authorization": f"Bearer {token}"}, timeout=30, **kwargs)


def _wait_for_dag(airflow: Airflow, token: str) -> dict:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        response = _api(airflow, token, "GET", f"/dags/{DAG}/details")
        if response.status_code == 200:
            return response.json()
        time.sleep(2)
    pytest.fail(f"{DAG} never appeared in the API:\n{airflow.log_tails()}")


def _ui_form_payload(details: dict, edits: dict) -> dict:
    """The body of POST /dags/{id}/dagRuns as the UI's trigger form builds it: every form field
    (the defaults the UI shows, with the user's edits), the logical date field (now, to the minute),
    and the optional fields left empty."""
    conf = {name: spec["value"] for name, spec in details["params"].items()} | edits
    now = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0)
    return {
        "conf": conf,
        "data_interval_end": None,
        "data_interval_start": None,
        "logical_date": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "partition_key": None,
    }


def test_rest_api_trigger_with_the_form_payload_runs_leanrec_train(airflow):
    assert requests.get(f"{airflow.base}/api/v2/dags/{DAG}", timeout=30).status_code == 401  # auth is on
    token = airflow.token()
    details = _wait_for_dag(airflow, token)
    assert set(details["params"]) >= {"source", "epochs", "compression_variants", "promotion_metric",
                                      "promotion_tolerance", "latency_budget_ms"}
    assert _api(airflow, token, "PATCH", f"/dags/{DAG}", json={"is_paused": False}).status_code == 200

    payload = _ui_form_payload(details, {**TINY_FORM, "compression_variants": ["int8", "fp16"]})
    response = _api(airflow, token, "POST", f"/dags/{DAG}/dagRuns", json=payload)
    assert response.status_code == 200, response.text
    run_id = response.json()["dag_run_id"]
    assert response.json()["conf"] == payload["conf"]

    deadline = time.monotonic() + 420
    state = None
    while time.monotonic() < deadline:
        state = _api(airflow, token, "GET", f"/dags/{DAG}/dagRuns/{run_id}").json()["state"]
        if state in ("success", "failed"):
            break
        time.sleep(3)
    instances = _api(airflow, token, "GET", f"/dags/{DAG}/dagRuns/{run_id}/taskInstances").json()["task_instances"]
    summary = {t["task_id"]: (t["state"], t["pool"], t["queue"]) for t in instances}
    assert state == "success", f"{state}: {summary}\n{airflow.log_tails()}"
    # int8 and fp16 are post-training variants: the mapped group of trained variants expands to nothing.
    expected = {t: "success" for t in [*TRAIN_ORDER, "compress", "post_training_variants", "trained_variants"]}
    assert {t: s[0] for t, s in summary.items()} == {**expected, "compress_with_training": "skipped"}
    assert summary["train"][1:] == ("gpu", "gpu") and summary["evaluate"][1:] == ("gpu", "gpu")

    root = Path(airflow.home) / "runs" / runs.run_key(run_id)
    info = json.loads((root / runs.RUN_INFO_FILE).read_text())
    assert info["form"]["compression_variants"] == ["int8", "fp16"]
    assert runs.run_params(root).train.epochs == TINY_FORM["epochs"]
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    assert set(metrics["models"]) == {"sasrec", "popularity", "bpr"}
    # The form's promotion fields reached the gate, and the first model became champion.
    assert runs.run_params(root).registry.policy.metric == payload["conf"]["promotion_metric"]
    assert json.loads((root / "reports" / "promotion.json").read_text())["decision"] == "promoted"
    xcom = _api(airflow, token, "GET", f"/dags/{DAG}/dagRuns/{run_id}/taskInstances/train/xcomEntries/return_value").json()
    assert json.loads(xcom["value"]) if isinstance(xcom["value"], str) else xcom["value"]


def test_trigger_form_screenshot_shows_every_parameter_with_its_description(airflow, tmp_path):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (Debian package `chromium`; .ci/run installs it)")
    token = airflow.token()
    details = _wait_for_dag(airflow, token)
    fields = {spec["schema"]["title"]: spec["description"] for spec in details["params"].values()}
    assert len(fields) == len(details["params"]) and all(fields.values())

    with Browser(chromium, width=1400, height=3600) as browser:
        # The UI authenticates with the JWT in the `_token` cookie (what its login page sets).
        browser.set_cookie(airflow.base, "_token", token)
        browser.navigate(f"{airflow.base}/dags/{DAG}")
        trigger = "[...document.querySelectorAll('button')].find(b => b.innerText.trim() === 'Trigger')"
        browser.wait_for(f"!!{trigger}", timeout=90, what="the Trigger button")
        browser.evaluate(f"{trigger}.click()")
        # The form's sections (Param section=) are an accordion with one section open at a time: open each
        # in turn and check that its fields' titles and descriptions render, inside the captured viewport.
        sections: dict[str, list[str]] = {}
        for spec in details["params"].values():
            sections.setdefault(spec["schema"].get("section"), []).extend([spec["schema"]["title"], spec["description"]])
        shots = []
        for number, (section, texts) in enumerate(sections.items()):
            header = f"""[...document.querySelectorAll('button[aria-expanded=false]')]
                .find(e => (e.innerText || '').trim() === {json.dumps(section)})"""
            visible = f"""{json.dumps(texts)}.every(t =>
                [...document.querySelectorAll('label, p, span, div')].some(e => {{
                const box = e.getBoundingClientRect();
                return (e.innerText || '').replace(/\\s*\\*\\s*$/, '').trim() === t && box.height > 0
                    && box.bottom <= window.innerHeight;
            }}))"""
            browser.click(header)  # nothing to click when the section is open already
            browser.wait_for(visible, timeout=60, what=f"every field title and description of section {section!r}")
            time.sleep(1)  # let the accordion's animation finish
            shots.append(browser.screenshot(tmp_path / f"leanrec_train_trigger_form_{number}_{section}.png"))
    assert len(sections) > 1 and None not in sections, sorted(sections, key=str)  # every field is in a section
    for shot in shots:
        assert shot.stat().st_size > 20_000
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    destinations = [*shots, *filter(None, map(keep_as_test_artifact, shots))]
    print("trigger form screenshots: " + ", ".join(str(p) for p in destinations))
