"""mlflow/server.sh runs MLflow's basic-auth app: no anonymous access, the workers' user writes,
the people's user reads only, no default or logged password (mlflow/README.md has the split)."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mlflow_server import READER, WORKER, auth_env, status, wait_for_login, worker_credentials

ROOT = Path(__file__).resolve().parents[1]
SERVER = ROOT / "mlflow" / "server.sh"
BOOTSTRAP = ROOT / "mlflow" / "bootstrap_users.py"


def _bootstrap_module():
    spec = importlib.util.spec_from_file_location("bootstrap_users", BOOTSTRAP)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def bootstrap_lock_suffix() -> str:
    return _bootstrap_module().LOCK_SUFFIX


def test_the_bootstrap_knows_the_promotion_lock_name():
    from pipeline.registry.store import LOCK_SUFFIX

    assert bootstrap_lock_suffix() == LOCK_SUFFIX


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _server_env(tmp_path: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LEANREC_MLFLOW_"))}
    env.update({"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path}/server.db",
                "MLFLOW_AUTH_DATABASE_URI": f"sqlite:///{tmp_path}/auth.db",
                "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "artifacts"),
                "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port), "TMPDIR": str(tmp_path / "tmp"), **extra})
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return env


def _start(tmp_path: Path, env: dict[str, str]) -> subprocess.Popen:
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed by _stop
    proc = subprocess.Popen(["bash", str(SERVER)], cwd=tmp_path, env=env, start_new_session=True,
                            stdout=log, stderr=subprocess.STDOUT)
    proc.log_file = log  # type: ignore[attr-defined]
    return proc


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=90)  # server.sh waits for MLflow's workers, then removes its auth config
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # workers left in the group must not outlive the test
        except ProcessLookupError:
            pass
        proc.log_file.close()


@pytest.mark.parametrize("missing", ["MLFLOW_AUTH_ADMIN_PASSWORD", "LEANREC_MLFLOW_WORKER_PASSWORD",
                                     "LEANREC_MLFLOW_READER_PASSWORD"])
def test_server_refuses_to_start_without_its_passwords(tmp_path, missing):
    env = _server_env(tmp_path, _free_port(), **auth_env())
    env[missing] = ""
    proc = _start(tmp_path, env)
    try:
        returncode = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        returncode = None  # it started a server: the test fails below, _stop ends it
    finally:
        _stop(proc)
    output = (tmp_path / "server.log").read_text()
    assert returncode == 2, output
    assert f"set {missing}" in output
    assert not (tmp_path / "server.db").exists()


def test_the_repo_ships_no_admin_password():
    for path in [SERVER, BOOTSTRAP, ROOT / "mlflow" / "Dockerfile", ROOT / "docker-compose.yml"]:
        text = path.read_text()
        assert "password1234" not in text, path
        if path != BOOTSTRAP:  # the auth config server.sh writes has no password line
            assert not re.search(r"(?m)^\s*admin_password\s*=", text), path


def test_bootstrap_accounts_need_distinct_users_and_passwords():
    bootstrap = _bootstrap_module()
    env = {"LEANREC_MLFLOW_WORKER_PASSWORD": "w" * 16, "LEANREC_MLFLOW_READER_PASSWORD": "r" * 16}
    roles = {a.role: (a.username, a.permission) for a in bootstrap.accounts(env)}
    assert roles == {"worker": ("leanrec-worker", "MANAGE"), "reader": ("leanrec-reader", "READ")}
    with_serving = bootstrap.accounts({**env, "LEANREC_MLFLOW_SERVING_PASSWORD": "s" * 16})
    assert [a.role for a in with_serving] == ["worker", "reader", "serving"]
    with pytest.raises(bootstrap.BootstrapError, match="LEANREC_MLFLOW_READER_PASSWORD"):
        bootstrap.accounts({"LEANREC_MLFLOW_WORKER_PASSWORD": "w" * 16})
    with pytest.raises(bootstrap.BootstrapError, match="different names"):
        bootstrap.accounts({**env, "LEANREC_MLFLOW_READER_USERNAME": "leanrec-worker"})


@pytest.mark.slow
def test_basic_auth_server_splits_workers_from_people(tmp_path, monkeypatch):
    from mlflow.exceptions import MlflowException

    from mlflow import MlflowClient

    secrets_env = auth_env()
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    env = _server_env(tmp_path, port, **secrets_env)
    proc = _start(tmp_path, env)
    try:
        wait_for_login(uri, READER, secrets_env["LEANREC_MLFLOW_READER_PASSWORD"], proc,
                       log=(tmp_path / "server.log").read_text())
        # Nobody gets in anonymously, nor with MLflow's old default admin password.
        assert status(uri, "/api/2.0/mlflow/experiments/search?max_results=1") == 401
        assert status(uri, "/api/2.0/mlflow/registered-models/get?name=leanrec") == 401
        assert status(uri, "/api/2.0/mlflow/users/current", "admin", "password1234") == 401

        # The worker (credentials from the environment, as in the stack): a run, a version, the aliases.
        for key, value in worker_credentials(secrets_env).items():
            monkeypatch.setenv(key, value)
        worker = MlflowClient(uri, uri)
        experiment = worker.get_experiment_by_name("leanrec")
        run = worker.create_run(experiment.experiment_id)
        worker.log_metric(run.info.run_id, "ndcg_at_10", 0.3)
        worker.log_text(run.info.run_id, "a model", "model/weights.txt")
        worker.set_terminated(run.info.run_id)
        version = worker.create_model_version("leanrec", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
        worker.set_registered_model_alias("leanrec", "challenger", version.version)
        worker.set_registered_model_alias("leanrec", "champion", version.version)
        worker.delete_registered_model_alias("leanrec", "challenger")

        # A person with the read-only user sees the champion but cannot move it or add a version.
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", READER)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secrets_env["LEANREC_MLFLOW_READER_PASSWORD"])
        reader = MlflowClient(uri, uri)
        assert reader.get_model_version_by_alias("leanrec", "champion").version == version.version
        # ... and downloads it, as the model server (read only too) does, in a process of its own.
        download_env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_REGISTRY_URI", "MLFLOW_TRACKING_URI")}
        download = subprocess.run(
            [sys.executable, "-c", "import sys; from mlflow.artifacts import download_artifacts; "
             "print(download_artifacts(artifact_uri='models:/leanrec@champion', dst_path=sys.argv[1]))",
             str(tmp_path / "download")],
            env={**download_env, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True, timeout=300)
        assert download.returncode == 0, download.stderr[-2000:]
        local = Path(download.stdout.strip().splitlines()[-1])
        assert (local / "weights.txt").read_text() == "a model", sorted(str(p) for p in local.rglob("*"))[:20]
        for refused in (lambda: reader.set_registered_model_alias("leanrec", "champion", version.version),
                        lambda: reader.delete_registered_model_alias("leanrec", "champion"),
                        lambda: reader.create_model_version("leanrec", f"runs:/{run.info.run_id}/model",
                                                            run_id=run.info.run_id),
                        lambda: reader.create_run(experiment.experiment_id)):
            with pytest.raises(MlflowException, match="403"):
                refused()
        # Whoever creates the promotion lock's name (a squatter), the worker can break it when stale.
        lock = "leanrec" + bootstrap_lock_suffix()
        reader.create_registered_model(lock, description='{"since": 0}')
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", WORKER)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secrets_env["LEANREC_MLFLOW_WORKER_PASSWORD"])
        MlflowClient(uri, uri).delete_registered_model(lock)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", READER)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secrets_env["LEANREC_MLFLOW_READER_PASSWORD"])
        # A wrong password is refused like no password.
        assert status(uri, "/api/2.0/mlflow/users/current", WORKER, "wrong-password-123") == 401

        # The bootstrap is idempotent (a restart runs it again) and keeps the grants.
        again = subprocess.run([sys.executable, str(BOOTSTRAP), "--timeout", "30"], env={**env, "MLFLOW_TRACKING_URI": uri},
                               capture_output=True, text=True, timeout=180)
        assert again.returncode == 0, again.stderr
        with pytest.raises(MlflowException, match="403"):
            reader.set_registered_model_alias("leanrec", "champion", version.version)
        log = (tmp_path / "server.log").read_text() + again.stdout + again.stderr
    finally:
        _stop(proc)
    # No password is ever written to a log.
    for password in secrets_env.values():
        assert password not in log
    assert not list((tmp_path / "tmp").glob("leanrec-basic-auth.*"))  # the generated auth config went with the server
