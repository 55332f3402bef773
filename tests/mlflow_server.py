"""mlflow/server.sh in tests: generated credentials, and waiting until a user can log in; and a plain
`mlflow server` over a test's own store, for tests that look at the UI.

The server answers /health before mlflow/bootstrap_users.py has created its users, so a test that
acts as a user waits for that user's login instead.
"""

from __future__ import annotations

import base64
import contextlib
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

WORKER = "leanrec-worker"
READER = "leanrec-reader"


def auth_env() -> dict[str, str]:
    """The passwords server.sh requires, freshly generated (never a fixed value)."""
    return {
        "MLFLOW_AUTH_ADMIN_PASSWORD": secrets.token_urlsafe(24),
        "LEANREC_MLFLOW_WORKER_PASSWORD": secrets.token_urlsafe(24),
        "LEANREC_MLFLOW_READER_PASSWORD": secrets.token_urlsafe(24),
    }


def worker_credentials(env: dict[str, str]) -> dict[str, str]:
    """What a worker's environment holds to talk to the server (MLflow's clients read these)."""
    return {"MLFLOW_TRACKING_USERNAME": WORKER, "MLFLOW_TRACKING_PASSWORD": env["LEANREC_MLFLOW_WORKER_PASSWORD"]}


def status(uri: str, path: str, user: str | None = None, password: str | None = None) -> int:
    """The HTTP status of GET uri+path, with basic auth when `user` is given."""
    request = urllib.request.Request(uri + path)
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def wait_for_login(uri: str, user: str, password: str, proc: subprocess.Popen, log: str = "",
                   seconds: float = 240) -> None:
    """Until `user` can log in (the bootstrap has run); fails if the server exits first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow/server.sh exited with {proc.returncode}\n{log}")
        try:
            if status(uri, "/api/2.0/mlflow/users/current", user, password) == 200:
                return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{user} could not log in to {uri} within {seconds:.0f} s\n{log}")


@contextlib.contextmanager
def plain_server(backend_store_uri: str, workdir: Path, seconds: float = 120) -> Iterator[str]:
    """`mlflow server` (no auth) over `backend_store_uri` on a free local port, run in `workdir`; yields its
    base URL once /health answers, and stops the server on exit."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = workdir / "mlflow-server.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri,
                                 "--default-artifact-root", (workdir / "mlartifacts").as_uri(), "--host", "127.0.0.1",
                                 "--port", str(port), "--workers", "1"], cwd=workdir, stdout=out, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + seconds
        while status_or_none(uri, "/health") != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not come up (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def status_or_none(uri: str, path: str) -> int | None:
    """`status`, or None while nothing listens yet."""
    try:
        return status(uri, path)
    except OSError:
        return None
