"""mlflow/server.sh in tests: generated credentials, and waiting until a user can log in.

The server answers /health before mlflow/bootstrap_users.py has created its users, so a test that
acts as a user waits for that user's login instead.
"""

from __future__ import annotations

import base64
import secrets
import subprocess
import time
import urllib.error
import urllib.request

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
