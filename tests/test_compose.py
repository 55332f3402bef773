"""docker-compose.yml: valid, localhost-only, secrets only through .env, versions agree with the project.

No Docker engine runs on these machines, so the stack itself is not started here; the file is
validated with Debian's `docker-compose config` (package docker-compose).
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def _variables(text: str) -> set[str]:
    # ${NAME}, ${NAME:-default}, ${NAME:?message}; $${NAME} is escaped for the container's shell.
    return set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", text))


def test_published_ports_bind_to_localhost_only():
    for name, service in _compose()["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"


def test_every_variable_is_documented_in_env_example():
    documented = {line.split("=", 1)[0] for line in ENV_EXAMPLE.read_text().splitlines() if "=" in line and not line.startswith("#")}
    assert _variables(COMPOSE.read_text(encoding="utf-8")) <= documented


def test_no_secret_is_written_in_the_compose_file():
    for name, service in _compose()["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if "PASSWORD" in key or "SECRET" in key:
                assert str(value).startswith("${"), f"{name}.{key} must come from .env"
    assert ".env" in (ROOT / ".gitignore").read_text().split() or "/.env" in (ROOT / ".gitignore").read_text().split()


def test_mlflow_image_uses_the_project_mlflow_version():
    pinned = re.search(r"^mlflow==(\S+)$", (ROOT / "constraints.txt").read_text(), flags=re.M).group(1)
    assert f'"mlflow=={pinned}"' in (ROOT / "mlflow" / "Dockerfile").read_text()


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="needs the Debian package docker-compose")
def test_compose_file_validates_and_requires_secrets(tmp_path):
    ok = subprocess.run(["docker-compose", "--env-file", str(ENV_EXAMPLE), "-f", str(COMPOSE), "config", "--quiet"],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    empty = tmp_path / "empty.env"
    empty.write_text("")
    missing = subprocess.run(["docker-compose", "--env-file", str(empty), "-f", str(COMPOSE), "config", "--quiet"],
                             capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert missing.returncode != 0 and "POSTGRES_USER" in missing.stderr
