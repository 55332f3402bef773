"""Every shell command of the README's three journeys, run as written, in order, on tiny synthetic
data in a temporary copy of the repository (its own DVC cache, mlflow.db and .airflow).

Lines marked "keeps running" start servers: they run in the background, and the next command
waits until the server answers. Where a journey's next line needs an earlier command's work to be
finished (a triggered DAG run), the test waits for it; it never runs a command the README does not
show. No command here needs Docker.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import copy_repo

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def journeys() -> dict[str, list[str]]:
    """Journey title -> its commands (one per line of its bash blocks)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Three journeys", 1)[1].split("\n## ", 1)[0]
    found = {}
    for title, body in re.findall(r"\n### (.+?)\n(.*?)(?=\n### |\Z)", section, flags=re.S):
        blocks = re.findall(r"```bash\n(.+?)\n```", body, flags=re.S)
        found[title] = [line for block in blocks for line in block.splitlines() if line.strip()]
    return found


def test_the_readme_has_three_journeys_with_commands():
    titles = list(journeys())
    assert len(titles) == 3 and all(journeys()[t] for t in titles)
    commands = "\n".join(c for t in titles for c in journeys()[t])
    for expected in ("dvc repro", "dvc exp run -S", "dvc metrics diff", "dvc plots show", "run_airflow.sh standalone",
                     "dags trigger leanrec_train", "mlflow ui", "pipeline promote", "pipeline rollback",
                     "pipeline.serving.server -m models:/leanrec@champion", "curl"):
        assert expected in commands


def _wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited ({proc.returncode}) before {url} answered:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except Exception:
            time.sleep(2)
    raise AssertionError(f"{url} did not answer within {timeout:.0f}s:\n{log.read_text()[-4000:]}")


def _server_url(command: str) -> str:
    """Where the server a `keeps running` line starts answers once it is up."""
    if "run_airflow.sh" in command:
        return "http://127.0.0.1:8080/api/v2/monitor/health"
    port = re.search(r"--port (\d+)", command).group(1)
    served = "models serve" in command or "pipeline.serving.server" in command
    return f"http://127.0.0.1:{port}/" + ("ping" if served else "health")


def _wait_for_dag_run(repo: Path, env: dict, timeout: float = 900) -> str:
    """The triggered leanrec_train run's final state (the journey's next line reads its report)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = subprocess.run(["dags/run_airflow.sh", "dags", "list-runs", "leanrec_train", "-o", "json"],
                              cwd=repo, env=env, capture_output=True, text=True, timeout=120)
        listing = re.search(r"^\[\{.*\}\]$", proc.stdout, flags=re.M)  # the JSON line, not the log lines around it
        if proc.returncode == 0 and listing:
            states = [row["state"] for row in json.loads(listing.group(0))]
            if states and states[0] in ("success", "failed"):
                return states[0]
        time.sleep(5)
    raise AssertionError("the triggered leanrec_train run did not finish")


def test_every_journey_command_works_as_written(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "GX_ANALYTICS_ENABLED": "false", "GIT_AUTHOR_NAME": "journey", "GIT_AUTHOR_EMAIL": "journey@example.invalid",
           "GIT_COMMITTER_NAME": "journey", "GIT_COMMITTER_EMAIL": "journey@example.invalid"}
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "AIRFLOW_HOME", "LEANREC_RUNS_DIR", "LEANREC_PROJECT_DIR",
                "LEANREC_PARAMS"):
        env.pop(key, None)  # the journeys use the project's own stores: here, the temporary copy's
    servers: list[subprocess.Popen] = []
    outputs: dict[str, str] = {}
    try:
        for title, commands in journeys().items():
            for command in commands:
                if command.startswith("cat .airflow/leanrec_runs/"):
                    assert _wait_for_dag_run(repo, env) == "success"
                if "keeps running" in command:
                    log = tmp_path / f"server-{len(servers)}.log"
                    proc = subprocess.Popen(["bash", "-c", command], cwd=repo, env=env, stdout=log.open("w"),
                                            stderr=subprocess.STDOUT, start_new_session=True)
                    servers.append(proc)
                    _wait_http(_server_url(command), 300, proc, log)
                    continue
                proc = subprocess.run(["bash", "-c", command], cwd=repo, env=env, capture_output=True, text=True, timeout=1200)
                output = proc.stdout + proc.stderr
                if "pipeline rollback" in command and proc.returncode != 0:
                    # As the README says: with a first champion there is nothing to roll back, and it says so.
                    assert "was the first champion" in output, output
                else:
                    assert proc.returncode == 0, f"[{title}] {command}\n{output[-4000:]}"
                outputs[command] = output
    finally:
        for proc in servers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in servers:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    def output_of(prefix: str) -> str:
        return next(out for cmd, out in outputs.items() if cmd.startswith(prefix))

    # What each journey promised to show, beyond exit codes.
    # The compact metrics file only (reports/summary.json), with the chosen variant's figures against HEAD.
    metrics_diff = output_of("dvc metrics diff")
    assert "reports/summary.json" in metrics_diff and "chosen.ndcg@10" in metrics_diff
    assert "reports/compression.json" not in metrics_diff
    assert (repo / "dvc_plots" / "index.html").exists()
    assert json.loads(output_of("cat .airflow/leanrec_runs/"))["rows_in"] > 0
    served = json.loads(output_of("curl"))["predictions"]
    assert len(served) == 2 and len(served[0]["items"]) == 5 and len(served[1]["items"]) == 10
