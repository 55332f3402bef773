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


# ----------------------------------------------------------------------------- the stack agrees with itself

STACK_SERVICES = {"postgres", "redis", "minio", "minio-init", "mlflow", "airflow-init", "airflow-apiserver",
                  "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer", "airflow-worker-cpu",
                  "airflow-worker-gpu", "model-server"}
ONE_SHOT = {"postgres-init", "minio-init", "airflow-init"}


def _env_example() -> dict[str, str]:
    return dict(line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if "=" in line and not line.startswith("#"))


def _expand(text: str) -> str:
    """${VAR}, ${VAR:-default}, ${VAR:?msg} replaced by .env.example's value (as compose would)."""
    values = _env_example()
    return re.sub(r"\$\{([A-Z_][A-Z0-9_]*)(?::[-?][^}]*)?\}", lambda m: values[m.group(1)], str(text))


def test_the_stack_has_every_service_with_healthchecks_and_ordered_starts():
    services = _compose()["services"]
    assert STACK_SERVICES <= set(services)
    for name, service in services.items():
        if name in ONE_SHOT:
            assert service.get("restart") == "no", f"{name} runs once"
            continue
        assert "healthcheck" in service, f"{name} has no healthcheck"
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            expected = "service_completed_successfully" if dependency in ONE_SHOT else "service_healthy"
            assert condition["condition"] == expected, f"{name} -> {dependency}"


def test_images_are_built_from_the_repo_with_the_project_pins():
    services = _compose()["services"]
    assert services["mlflow"]["build"] == "./mlflow"
    airflow_build = services["airflow-scheduler"]["build"]
    dockerfile = (ROOT / airflow_build["context"] / airflow_build["dockerfile"]).read_text()
    assert 'pip install -c constraints.txt ".[stack]"' in dockerfile
    for name in ("airflow-apiserver", "airflow-worker-cpu", "airflow-worker-gpu", "model-server"):
        assert services[name]["image"] == services["airflow-scheduler"]["image"]
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line)
    mlflow_dockerfile = (ROOT / "mlflow" / "Dockerfile").read_text()
    assert f'"psycopg2-binary=={pins["psycopg2-binary"]}"' in mlflow_dockerfile
    assert '"boto3==' in mlflow_dockerfile  # S3 artifacts on MinIO


def test_the_celery_executor_and_s3_remote_packages_are_installed():
    # What the Airflow image installs (the `stack` extra) resolves with the project's pins and imports.
    import dvc_s3  # noqa: F401
    import psycopg2  # noqa: F401
    import redis  # noqa: F401
    from airflow.providers.celery.executors.celery_executor import CeleryExecutor  # noqa: F401

    env = _compose()["x-airflow-common"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert _expand(env["AIRFLOW__CELERY__BROKER_URL"]).startswith("redis://:change-me@redis:6379/")
    assert _expand(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]).endswith("@postgres:5432/airflow")


def test_gpu_worker_queue_and_pool_match_the_airflow_settings():
    services = _compose()["services"]
    gpu = services["airflow-worker-gpu"]
    env = gpu["environment"]
    queue = gpu["command"][gpu["command"].index("--queues") + 1]
    assert queue == env["LEANREC_GPU_QUEUE"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    cpu = services["airflow-worker-cpu"]["command"]
    assert cpu[cpu.index("--queues") + 1] == "default"  # Airflow's default queue: every task without a queue
    launcher = (ROOT / "dags" / "run_airflow.sh").read_text()
    assert f'LEANREC_GPU_POOL:-{env["LEANREC_GPU_POOL"]}' in launcher  # the pool `setup` creates
    assert services["airflow-init"]["command"] == ["dags/run_airflow.sh", "setup"]


def test_bucket_and_mlflow_uris_agree_across_services_and_dvc():
    services = _compose()["services"]
    bucket = _env_example()["MINIO_BUCKET"]
    assert "$${MINIO_BUCKET}" in services["minio-init"]["entrypoint"][-1]
    assert _expand(services["mlflow"]["environment"]["MLFLOW_ARTIFACTS_DESTINATION"]) == f"s3://{bucket}/mlflow"
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    dvc_config = (ROOT / ".dvc" / "config").read_text()
    assert re.search(rf"url = s3://{bucket}/dvc\n\s+endpointurl = http://127.0.0.1:{_env_example()['MINIO_PORT']}", dvc_config)
    mlflow_port = services["mlflow"]["environment"]["MLFLOW_PORT"]
    for name in ("airflow-scheduler", "airflow-worker-cpu", "airflow-worker-gpu", "model-server"):
        assert services[name]["environment"]["MLFLOW_TRACKING_URI"] == f"http://mlflow:{mlflow_port}"


def test_model_server_serves_the_registry_champion():
    import yaml as _yaml

    command = " ".join(_compose()["services"]["model-server"]["command"])
    model_name = _yaml.safe_load((ROOT / "params.yaml").read_text()).get("registry", {}).get("model_name", "leanrec")
    assert f"models:/{_expand('${REGISTERED_MODEL:-leanrec}')}@champion" in _expand(command)
    assert _env_example()["REGISTERED_MODEL"] == model_name
    assert "--env-manager local" in command
