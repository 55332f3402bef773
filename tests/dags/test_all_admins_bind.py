"""All-admins mode (no login) is refused off loopback, however the bind address is given: the
environment, airflow.cfg, `api-server -H/--host`, `standalone`, IPv6, names that resolve elsewhere."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.orchestration import airflow_bind

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "dags" / "run_airflow.sh"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost", " 127.0.0.1 "])
def test_loopback_addresses_are_loopback(host):
    assert airflow_bind.is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]", "", "  ", "192.168.1.10", "10.0.0.1", "172.17.0.1",
                                  "fe80::1", "2001:db8::1", "::ffff:0.0.0.0", "no-such-host.invalid"])
def test_every_other_address_is_not(host):
    assert not airflow_bind.is_loopback(host)


def test_a_name_is_loopback_only_if_all_it_resolves_to_is(monkeypatch):
    table = {"lan-box": ["192.168.1.5"], "mixed": ["127.0.0.1", "10.0.0.2"], "dev": ["127.0.0.1", "::1"]}

    def fake_getaddrinfo(name, *_args, **_kwargs):
        if name not in table:
            raise socket.gaierror(name)
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, 0)) for a in table[name]]

    monkeypatch.setattr(airflow_bind.socket, "getaddrinfo", fake_getaddrinfo)
    assert airflow_bind.is_loopback("dev")
    assert not airflow_bind.is_loopback("lan-box") and not airflow_bind.is_loopback("mixed")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(tmp_path: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "LEANREC_", "GUNICORN"))}
    env.update({"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "AIRFLOW_HOME": str(tmp_path),
                "LEANREC_AIRFLOW_PORT": str(_free_port()), **settings})
    return env


def _run(command: list[str], env: dict[str, str], timeout: float = 90) -> subprocess.CompletedProcess:
    """Run in its own process group: a server it should not have started is ended with it."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{command} was not refused: it ran for {timeout} s (a server started?)\n{err[-2000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


@pytest.mark.parametrize("settings, arguments", [
    ({"LEANREC_AIRFLOW_ALL_ADMINS": "true", "LEANREC_AIRFLOW_HOST": "0.0.0.0"}, ["api-server"]),
    ({"LEANREC_AIRFLOW_ALL_ADMINS": "true", "AIRFLOW__API__HOST": "::"}, ["api-server"]),
    ({"LEANREC_AIRFLOW_ALL_ADMINS": "true"}, ["api-server", "-H", "0.0.0.0"]),
    ({"LEANREC_AIRFLOW_ALL_ADMINS": "true"}, ["api-server", "--host=::"]),
    ({"LEANREC_AIRFLOW_ALL_ADMINS": "true"}, ["api-server", "--ho", "0.0.0.0"]),  # argparse's abbreviation
    ({"LEANREC_AIRFLOW_ALL_ADMINS": "true"}, ["api-server", "-H", "no-such-host.invalid"]),
    ({"LEANREC_AIRFLOW_ALL_ADMINS": "true", "AIRFLOW__API__HOST": "[::]"}, ["standalone"]),
    # all-admins spelt as Airflow also reads it (the old check knew only "true")
    ({"AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "1", "LEANREC_AIRFLOW_HOST": "0.0.0.0"}, ["api-server"]),
    ({"AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": " T ", "LEANREC_AIRFLOW_HOST": "0.0.0.0"}, ["api-server"]),
])
def test_launcher_refuses_all_admins_off_loopback(tmp_path, settings, arguments):
    result = _run([str(LAUNCHER), *arguments], _env(tmp_path, **settings))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "refusing all-admins mode (no login)" in result.stderr and "loopback only" in result.stderr


def test_launcher_keeps_all_admins_on_loopback(tmp_path):
    result = _run([str(LAUNCHER), "version"], _env(tmp_path, LEANREC_AIRFLOW_ALL_ADMINS="true", LEANREC_AIRFLOW_HOST="::1"))
    assert result.returncode == 0, result.stderr[-2000:]
    allowed = _run([sys.executable, "-m", "pipeline.orchestration.airflow_bind", "api-server", "-H", "localhost"],
                   {**_env(tmp_path, AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="True"), "PYTHONPATH": str(ROOT)})
    assert allowed.returncode == 0, allowed.stderr[-2000:]


def test_airflow_cfg_settings_are_read_too(tmp_path):
    # Airflow started without the launcher: all-admins and the host from airflow.cfg alone.
    (tmp_path / "airflow.cfg").write_text("[core]\nsimple_auth_manager_all_admins = True\n\n[api]\nhost = 0.0.0.0\n")
    env = {**_env(tmp_path), "PYTHONPATH": str(ROOT)}
    for arguments in (["api-server"], ["standalone"]):
        refused = _run([sys.executable, "-m", "pipeline.orchestration.airflow_bind", *arguments], env)
        assert refused.returncode == 2 and "'0.0.0.0'" in refused.stderr, refused.stderr[-2000:]
    # With login (all-admins off), any host is the operator's choice.
    (tmp_path / "airflow.cfg").write_text("[core]\nsimple_auth_manager_all_admins = False\n\n[api]\nhost = 0.0.0.0\n")
    assert _run([sys.executable, "-m", "pipeline.orchestration.airflow_bind", "api-server"], env).returncode == 0


def test_gunicorn_bind_arguments_are_refused_in_all_admins_mode(tmp_path):
    env = {**_env(tmp_path, AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="true", AIRFLOW__API__HOST="127.0.0.1",
                  AIRFLOW__API__SERVER_TYPE="gunicorn", GUNICORN_CMD_ARGS="--bind 0.0.0.0:8080"), "PYTHONPATH": str(ROOT)}
    refused = _run([sys.executable, "-m", "pipeline.orchestration.airflow_bind", "api-server"], env)
    assert refused.returncode == 2 and "GUNICORN_CMD_ARGS" in refused.stderr
