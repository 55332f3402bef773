"""`dags/run_airflow.sh standalone` stopped by SIGTERM (or SIGINT, SIGHUP) stops every process it started.

`airflow standalone` alone ignores SIGTERM and leaves its scheduler, API server, triggerer and the
executor's workers running. The launcher runs it in a session of its own and, signalled, stops that
session and everything below it (SIGKILL for what outlives LEANREC_AIRFLOW_STOP_TIMEOUT).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "dags" / "run_airflow.sh"

# Stands in for `airflow`: setup's commands succeed; `standalone` ignores SIGTERM, as the real one does,
# and leaves behind a child that exits on SIGTERM, one that ignores it, and one that ignores it in a
# session of its own (out of the launcher's process group, still below it). Each writes its pid.
FAKE_AIRFLOW = """#!/usr/bin/env bash
case "$1" in
  standalone)
    echo $$ >>"$FAKE_PIDS"
    sleep 1000 & echo $! >>"$FAKE_PIDS"
    bash -c 'trap "" TERM; echo $$ >>"$FAKE_PIDS"; while :; do sleep 0.1; done' &
    setsid bash -c 'trap "" TERM; echo $$ >>"$FAKE_PIDS"; while :; do sleep 0.1; done' &
    trap '' TERM
    while :; do sleep 0.1; done
    ;;
  *) exit 0 ;;
esac
"""


def running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie has exited: only its parent has yet to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def processes_with(marker: str) -> list[int]:
    """Live processes whose environment holds `marker` (a unique value of a variable they inherited)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environ = (entry / "environ").read_bytes()
            except (FileNotFoundError, PermissionError, ProcessLookupError):
                continue
            if marker.encode() in environ.split(b"\0") and running(int(entry.name)):
                found.append(int(entry.name))
    return found


def _wait_until(condition, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


@pytest.fixture
def fake_project(tmp_path) -> Path:
    """The launcher in a project folder of its own (no .venv: the fake `airflow` on PATH is the one found)."""
    (tmp_path / "project" / "dags").mkdir(parents=True)
    shutil.copy2(LAUNCHER, tmp_path / "project" / "dags" / "run_airflow.sh")
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "airflow"
    fake.write_text(FAKE_AIRFLOW)
    fake.chmod(0o755)
    return tmp_path


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_stops_everything_standalone_started(fake_project, sig):
    pids = fake_project / "pids"
    env = {**os.environ, "PATH": f"{fake_project / 'bin'}{os.pathsep}{os.environ['PATH']}",
           "AIRFLOW_HOME": str(fake_project / "home"), "FAKE_PIDS": str(pids), "LEANREC_AIRFLOW_STOP_TIMEOUT": "2"}
    env.pop("LEANREC_AIRFLOW_ALL_ADMINS", None)
    # The launcher starts with the signal at its default disposition: a shell cannot trap a signal that was ignored
    # when it started, and a test run under nohup (SIGHUP ignored, inherited) would otherwise see it ignored.
    launcher = subprocess.Popen([str(fake_project / "project" / "dags" / "run_airflow.sh"), "standalone"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(sig, signal.SIG_DFL))
    try:
        assert _wait_until(lambda: pids.exists() and len(pids.read_text().split()) == 4, 30), "fake standalone did not start"
        started = [int(p) for p in pids.read_text().split()]
        assert all(running(p) for p in started)
        launcher.send_signal(sig)
        _, stderr = launcher.communicate(timeout=30)
        assert launcher.returncode == 143
        # The ones that ignore SIGTERM too: SIGKILL after the timeout.
        assert _wait_until(lambda: not any(running(p) for p in started), 5), \
            f"still running: {[p for p in started if running(p)]}\n{stderr}"
        assert "stopping airflow standalone" in stderr and "killing what is still running" in stderr
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for pid in [int(p) for p in pids.read_text().split()] if pids.exists() else []:
            if running(pid):
                os.kill(pid, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_stops_the_real_airflow_standalone(tmp_path):
    """The real `airflow standalone` (a migrated SQLite home, a free port): up with its components, then
    SIGTERM to the launcher, and no process that inherited its AIRFLOW_HOME remains."""
    home = tmp_path / "airflow_home"
    marker = f"AIRFLOW_HOME={home}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "LEANREC_"))},
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "AIRFLOW_HOME": str(home), "LEANREC_AIRFLOW_PORT": str(_free_port()),
        "LEANREC_RUNS_DIR": str(tmp_path / "runs"), "LEANREC_AIRFLOW_STOP_TIMEOUT": "60",
        "AIRFLOW__CORE__PARALLELISM": "4",
    }
    log = (tmp_path / "standalone.log").open("w")
    launcher = subprocess.Popen([str(LAUNCHER), "standalone"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        # The scheduler, API server, DAG processor and triggerer (and the executor's workers) are up.
        up = _wait_until(lambda: len(processes_with(marker)) >= 6 or launcher.poll() is not None, 300, 1)
        assert up and launcher.poll() is None, (tmp_path / "standalone.log").read_text()[-3000:]
        time.sleep(10)  # let every component finish starting its own children
        started = processes_with(marker)
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=120)
        assert _wait_until(lambda: not processes_with(marker), 10), \
            f"{len(started)} processes before, left: {processes_with(marker)}"
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for pid in processes_with(marker):
            os.kill(pid, signal.SIGKILL)
        log.close()
