"""Create or update LeanRec's MLflow users and their permissions, as the admin (idempotent).

mlflow/server.sh runs it once the basic-auth server answers; it is safe to run again at any time
(a restart, a rotated password): a user that exists gets the password from the environment again.

    worker   LEANREC_MLFLOW_WORKER_USERNAME (default leanrec-worker) / LEANREC_MLFLOW_WORKER_PASSWORD
             MANAGE on the experiment, the registered model and its promotion lock: logs runs,
             registers versions, moves and deletes the `challenger` / `champion` aliases.
    reader   LEANREC_MLFLOW_READER_USERNAME (default leanrec-reader) / LEANREC_MLFLOW_READER_PASSWORD
             READ: people browse runs and models; they cannot register or move an alias.
    serving  LEANREC_MLFLOW_SERVING_USERNAME (default leanrec-serving) / LEANREC_MLFLOW_SERVING_PASSWORD
             READ, for the model server (optional: without a password, no such user).

The experiment (LEANREC_MLFLOW_EXPERIMENT, default leanrec) and the registered model
(LEANREC_MLFLOW_MODEL, default leanrec) are created here by the admin when missing, so no other
user can create them first and own them. The admin is MLFLOW_AUTH_ADMIN_USERNAME (default admin)
with MLFLOW_AUTH_ADMIN_PASSWORD; the server is MLFLOW_TRACKING_URI. No password is ever logged.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

logger = logging.getLogger("leanrec.mlflow.bootstrap")

WORKER_PERMISSION = "MANAGE"  # the delete of an alias needs MANAGE (EDIT: update only)
# The promote stage's lock is a registered model `<model><LOCK_SUFFIX>` it creates and deletes
# (pipeline/registry/store.py LOCK_SUFFIX; this script runs in the MLflow image, without `pipeline`).
# The worker gets MANAGE on that name before it exists, so it can break a stale lock whoever made it.
LOCK_SUFFIX = ".promotion-lock"
READ_PERMISSION = "READ"


class BootstrapError(RuntimeError):
    """The users or permissions could not be set up."""


@dataclass(frozen=True)
class Account:
    role: str
    username: str
    password: str
    permission: str


def accounts(env: dict[str, str]) -> list[Account]:
    """The accounts the environment asks for: worker and reader are required, serving is optional."""
    spec = [("worker", "leanrec-worker", WORKER_PERMISSION, True),
            ("reader", "leanrec-reader", READ_PERMISSION, True),
            ("serving", "leanrec-serving", READ_PERMISSION, False)]
    found = []
    for role, default_name, permission, required in spec:
        prefix = f"LEANREC_MLFLOW_{role.upper()}"
        password = env.get(f"{prefix}_PASSWORD") or ""
        if not password:
            if required:
                raise BootstrapError(f"set {prefix}_PASSWORD: the {role} user's password")
            continue
        found.append(Account(role, env.get(f"{prefix}_USERNAME") or default_name, password, permission))
    names = [a.username for a in found] + [env.get("MLFLOW_AUTH_ADMIN_USERNAME") or "admin"]
    if len(set(names)) != len(names):
        raise BootstrapError(f"the admin, worker, reader and serving users must have different names, got {names}")
    return found


def wait_for_server(uri: str, timeout_s: float, pid: int | None) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=3) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if pid is not None and not _alive(pid):
            raise BootstrapError(f"the MLflow server (pid {pid}) exited before answering on {uri}")
        if time.monotonic() > deadline:
            raise BootstrapError(f"the MLflow server did not answer on {uri}/health within {timeout_s:.0f} s")
        time.sleep(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by server.sh) still answers kill(0).
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _ensure_user(auth, account: Account) -> None:
    from mlflow.exceptions import RestException

    try:
        user = auth.get_user(account.username)
    except RestException:
        auth.create_user(account.username, account.password)
        logger.info("created MLflow user %s (%s)", account.username, account.role)
        return
    auth.update_user_password(account.username, account.password)
    if user.is_admin:
        auth.update_user_admin(account.username, False)
    logger.info("updated MLflow user %s (%s)", account.username, account.role)


def _grant(auth, username: str, resource_type: str, resource_id: str, permission: str) -> None:
    """`permission` on the resource, replacing whatever grant the user had there."""
    from mlflow.exceptions import RestException

    try:
        auth.grant_user_permission(username, resource_type, resource_id, permission)
    except RestException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        auth.revoke_user_permission(username, resource_type, resource_id)
        auth.grant_user_permission(username, resource_type, resource_id, permission)


def _ensure_experiment(client, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    logger.info("created MLflow experiment %s", name)
    return client.create_experiment(name)


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(name, description="LeanRec: `champion` is what the model server serves")
        logger.info("created registered model %s", name)


def bootstrap(uri: str, env: dict[str, str]) -> list[Account]:
    """Users, the experiment, the registered model and the grants; returns the accounts set up."""
    admin_password = env.get("MLFLOW_AUTH_ADMIN_PASSWORD") or ""
    if not admin_password:
        raise BootstrapError("set MLFLOW_AUTH_ADMIN_PASSWORD: the bootstrap works as the admin")
    wanted = accounts(env)
    # The MLflow clients read the credentials from the environment (never from the URI, never logged).
    os.environ["MLFLOW_TRACKING_USERNAME"] = env.get("MLFLOW_AUTH_ADMIN_USERNAME") or "admin"
    os.environ["MLFLOW_TRACKING_PASSWORD"] = admin_password
    from mlflow.server.auth.client import AuthServiceClient

    from mlflow import MlflowClient

    auth = AuthServiceClient(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment_id = _ensure_experiment(client, env.get("LEANREC_MLFLOW_EXPERIMENT") or "leanrec")
    model = env.get("LEANREC_MLFLOW_MODEL") or "leanrec"
    _ensure_registered_model(client, model)
    for account in wanted:
        _ensure_user(auth, account)
        _grant(auth, account.username, "experiment", experiment_id, account.permission)
        _grant(auth, account.username, "registered_model", model, account.permission)
        if account.role == "worker":
            _grant(auth, account.username, "registered_model", model + LOCK_SUFFIX, account.permission)
        logger.info("%s: %s on experiment %s and registered model %s", account.username, account.permission,
                    experiment_id, model)
    return wanted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wait-pid", type=int, default=None, help="give up if this process (the server) exits")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the server")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    uri = (os.environ.get("MLFLOW_TRACKING_URI") or "").rstrip("/")
    if not uri.startswith(("http://", "https://")):
        logger.error("set MLFLOW_TRACKING_URI to the server's http(s) address")
        return 2
    try:
        wait_for_server(uri, args.timeout, args.wait_pid)
        bootstrap(uri, dict(os.environ))
    except BootstrapError as err:
        logger.error("%s", err)
        return 2
    except Exception as err:  # noqa: BLE001 - the message, not a traceback full of request details
        logger.error("bootstrap of the MLflow users failed: %s: %s", type(err).__name__, err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
