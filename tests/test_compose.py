"""docker-compose.yml: valid, localhost-only, secrets only through .env, versions agree with the project.

No Docker engine runs on these machines, so the stack itself is not started here; the file is
validated with Debian's `docker-compose config` (package docker-compose).
"""

import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
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
    assert f'"mlflow[auth]=={pinned}"' in (ROOT / "mlflow" / "Dockerfile").read_text()  # the basic-auth app


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="needs the Debian package docker-compose")
def test_compose_file_validates_and_requires_secrets(tmp_path):
    ok = subprocess.run(["docker-compose", "--env-file", str(ENV_EXAMPLE), "-f", str(COMPOSE), "config", "--quiet"],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    empty = tmp_path / "empty.env"
    empty.write_text("")
    missing = subprocess.run(["docker-compose", "--env-file", str(empty), "-f", str(COMPOSE), "config", "--quiet"],
                             capture_output=True, text=True, timeout=60, cwd=tmp_path, env=_env_without_stack_variables())
    assert missing.returncode != 0 and "POSTGRES_USER" in missing.stderr


def _env_without_stack_variables() -> dict[str, str]:
    """This process's environment less anything .env.example sets (compose would read it first)."""
    return {k: v for k, v in os.environ.items() if k not in _env_example()}


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="needs the Debian package docker-compose")
def test_compose_stops_naming_each_missing_secret(tmp_path):
    env = _env_without_stack_variables()
    for name in sorted(_secret_variables()):
        partial = tmp_path / f"without-{name}.env"
        partial.write_text("".join(f"{k}={v}\n" for k, v in _env_example().items() if k != name))
        result = subprocess.run(["docker-compose", "--env-file", str(partial), "-f", str(COMPOSE), "config", "--quiet"],
                                capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
        assert result.returncode != 0, f"compose starts without {name}"
        assert f"set {name} in .env" in result.stderr, result.stderr


# ----------------------------------------------------------------------------- the stack agrees with itself

STACK_SERVICES = {"postgres", "postgres-init", "redis", "minio", "minio-init", "mlflow", "airflow-init", "airflow-apiserver",
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
    import asyncpg  # noqa: F401  (Airflow 3's async metadata-DB engine on Postgres)
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
    # Without a GPU (profile no-gpu): the same worker of the same queue, less the device reservation.
    on_cpu = services["airflow-worker-gpu-on-cpu"]
    assert on_cpu["profiles"] == ["no-gpu"] and "deploy" not in on_cpu
    assert {k: v for k, v in gpu.items() if k != "deploy"} == {k: v for k, v in on_cpu.items() if k != "profiles"}
    launcher = (ROOT / "dags" / "run_airflow.sh").read_text()
    assert f'LEANREC_GPU_POOL:-{env["LEANREC_GPU_POOL"]}' in launcher  # the pool `setup` creates
    assert services["airflow-init"]["command"] == ["dags/run_airflow.sh", "setup"]


def test_bucket_and_mlflow_uris_agree_across_services_and_dvc():
    services = _compose()["services"]
    bucket = _env_example()["MINIO_BUCKET"]
    assert services["minio-init"]["environment"]["MINIO_BUCKET"].startswith("${MINIO_BUCKET:?")
    assert 'mc mb --ignore-existing "stack/$MINIO_BUCKET"' in (ROOT / "stack" / "minio-init.sh").read_text()
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
    assert command.startswith("python -m pipeline.serving.server")  # the guarded server, not bare `mlflow models serve`


def test_every_service_that_imports_mlflow_has_its_telemetry_off():
    # MLflow's telemetry thread unsets an environment variable while requests iterates os.environ
    # (a KeyError that failed `evaluate` in CI's stack run); our images (leanrec-*) all import mlflow.
    ours = {name: service for name, service in _compose()["services"].items() if service.get("image", "").startswith("leanrec-")}
    assert {"mlflow", "model-server", "airflow-worker-cpu", "airflow-worker-gpu"} <= set(ours)
    telemetry = {name: service.get("environment", {}).get("MLFLOW_DISABLE_TELEMETRY") for name, service in ours.items()}
    assert telemetry == dict.fromkeys(ours, "true")


# ----------------------------------------------------------------------------- least privilege: one credential per service

SECRET = re.compile(r"PASSWORD|SECRET|_KEY$|ACCESS_KEY|_USER$")


def _secret_variables() -> set[str]:
    return {name for name in _variables(COMPOSE.read_text(encoding="utf-8")) if SECRET.search(name)}


def _services_using(variable: str) -> set[str]:
    services = _compose()["services"]
    return {name for name, service in services.items() if re.search(rf"\$\{{{variable}\b", yaml.safe_dump(service))}


def test_every_secret_must_be_set_and_is_only_a_placeholder_in_env_example():
    text = COMPOSE.read_text(encoding="utf-8")
    for name in _secret_variables():
        uses = re.findall(rf"(?<!\$)\$\{{{name}(:[-?])?", text)
        assert uses and all(use == ":?" for use in uses), f"${{{name}}} must be ${{{name}:?...}} everywhere"
    values = _env_example()
    for name in _secret_variables():
        if "PASSWORD" in name or "SECRET" in name:
            assert values[name].startswith("change-me"), f".env.example holds a value for {name}"


def test_the_postgres_superuser_is_only_for_postgres_and_its_init():
    assert _services_using("POSTGRES_USER") == _services_using("POSTGRES_PASSWORD") == {"postgres", "postgres-init"}
    services = _compose()["services"]
    airflow = _expand(_compose()["x-airflow-common"]["environment"]["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    mlflow = services["mlflow"]["environment"]
    values = _env_example()
    assert airflow.startswith(f"postgresql+psycopg2://{values['AIRFLOW_DB_USER']}:")
    assert _expand(mlflow["MLFLOW_BACKEND_STORE_URI"]).startswith(f"postgresql+psycopg2://{values['MLFLOW_DB_USER']}:")
    assert _expand(mlflow["MLFLOW_AUTH_DATABASE_URI"]).endswith(f"/{values['MLFLOW_AUTH_DB']}")
    roles = {values["POSTGRES_USER"], values["AIRFLOW_DB_USER"], values["MLFLOW_DB_USER"]}
    assert len(roles) == 3
    assert _services_using("AIRFLOW_DB_PASSWORD") == {"postgres-init"} | AIRFLOW_SERVICES - {"model-server"}
    assert _services_using("MLFLOW_DB_PASSWORD") == {"postgres-init", "mlflow"}
    init = services["postgres-init"]
    assert init["volumes"] == ["./stack/postgres-init.sh:/usr/local/bin/leanrec-postgres-init:ro"]
    script = (ROOT / "stack" / "postgres-init.sh").read_text()
    assert "NOSUPERUSER NOCREATEDB NOCREATEROLE" in script and "REVOKE ALL ON DATABASE" in script


AIRFLOW_SERVICES = {"airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
                    "airflow-worker-cpu", "airflow-worker-gpu", "airflow-worker-gpu-on-cpu", "model-server"}


def test_minio_root_keys_are_only_for_minio_and_its_init():
    assert _services_using("MINIO_ROOT_USER") == _services_using("MINIO_ROOT_PASSWORD") == {"minio", "minio-init"}
    mlflow = _compose()["services"]["mlflow"]["environment"]
    assert mlflow["AWS_ACCESS_KEY_ID"] == "${MINIO_MLFLOW_ACCESS_KEY:?set MINIO_MLFLOW_ACCESS_KEY in .env}"
    assert _services_using("MINIO_MLFLOW_SECRET_KEY") == {"minio-init", "mlflow"}
    assert _services_using("MINIO_DVC_SECRET_KEY") == {"minio-init"}  # DVC runs on the host, with its own keys
    values = _env_example()
    assert len({values["MINIO_ROOT_USER"], values["MINIO_MLFLOW_ACCESS_KEY"], values["MINIO_DVC_ACCESS_KEY"]}) == 3
    script = (ROOT / "stack" / "minio-init.sh").read_text()
    # one user per client, each with a policy on its own prefix of the bucket only
    assert 'user "$MINIO_MLFLOW_ACCESS_KEY" "$MINIO_MLFLOW_SECRET_KEY" mlflow' in script
    assert 'user "$MINIO_DVC_ACCESS_KEY" "$MINIO_DVC_SECRET_KEY" dvc' in script
    assert '"Resource": ["arn:aws:s3:::$MINIO_BUCKET/$3/*"]' in script
    assert "AWS_ACCESS_KEY_ID=$MINIO_DVC_ACCESS_KEY" in ENV_EXAMPLE.read_text()


def test_mlflow_requires_login_with_one_user_per_client():
    services = _compose()["services"]
    mlflow = services["mlflow"]["environment"]
    assert mlflow["MLFLOW_AUTH_ADMIN_PASSWORD"].startswith("${MLFLOW_ADMIN_PASSWORD:?")
    assert 'CMD ["leanrec-mlflow-server"]' in (ROOT / "mlflow" / "Dockerfile").read_text()
    assert "--app-name basic-auth" in (ROOT / "mlflow" / "server.sh").read_text()
    clients = {"airflow-worker-cpu": "WORKER", "airflow-worker-gpu": "WORKER", "airflow-worker-gpu-on-cpu": "WORKER",
               "model-server": "SERVING"}
    for name, role in clients.items():
        env = services[name]["environment"]
        assert env["MLFLOW_TRACKING_USERNAME"] == mlflow[f"LEANREC_MLFLOW_{role}_USERNAME"], name
        assert env["MLFLOW_TRACKING_PASSWORD"] == mlflow[f"LEANREC_MLFLOW_{role}_PASSWORD"], name
    # Only the workers hold the worker's password, only the model server the serving one; the people's
    # (reader) and the admin's go to the MLflow server alone.
    assert _services_using("MLFLOW_WORKER_PASSWORD") == {"mlflow", "airflow-worker-cpu", "airflow-worker-gpu", "airflow-worker-gpu-on-cpu"}
    assert _services_using("MLFLOW_SERVING_PASSWORD") == {"mlflow", "model-server"}
    assert _services_using("MLFLOW_READER_PASSWORD") == _services_using("MLFLOW_ADMIN_PASSWORD") == {"mlflow"}
    assert "MLFLOW_TRACKING_PASSWORD" not in _compose()["x-airflow-common"]["environment"]
    # healthy only once the bootstrap has created the users (the worker can log in)
    assert "/api/2.0/mlflow/users/current" in " ".join(services["mlflow"]["healthcheck"]["test"])


@pytest.fixture
def postgres_server():
    """A throwaway Postgres cluster on a Unix socket (no TCP), with a password-protected superuser."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb is None or pg_ctl is None or shutil.which("psql") is None:
        pytest.skip("needs the PostgreSQL server binaries (initdb, pg_ctl, psql)")
    as_user: list[str] = []
    directory = Path(tempfile.mkdtemp(prefix="leanrec-pg-"))
    if os.geteuid() == 0:  # initdb refuses root: run the cluster as the `postgres` system user
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run the cluster")
        os.chown(directory, owner.pw_uid, owner.pw_gid)
        # runuser lives in /usr/sbin, which a minimal PATH (CI's `env -i`) leaves out.
        runuser = shutil.which("runuser") or shutil.which("runuser", path="/usr/sbin:/sbin")
        if runuser is None:
            pytest.skip("running as root and there is no runuser to run the cluster as `postgres`")
        as_user = [runuser, "-u", "postgres", "--"]
    directory.chmod(0o755)
    password = secrets.token_urlsafe(16)
    (directory / "pw").write_text(password)
    if as_user:
        os.chown(directory / "pw", owner.pw_uid, owner.pw_gid)
    data = directory / "data"
    subprocess.run([*as_user, initdb, "-D", str(data), "-U", "superuser", "--auth=scram-sha-256",
                    f"--pwfile={directory / 'pw'}"], check=True, capture_output=True, timeout=120)
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-l", str(directory / "log"), "-w", "-o",
                    f"-k {directory} -c listen_addresses=''", "start"], check=True, capture_output=True, timeout=120)
    try:
        yield {"PGHOST": str(directory), "PGUSER": "superuser", "PGPASSWORD": password}
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(directory, ignore_errors=True)


def test_postgres_init_gives_each_service_its_own_unprivileged_role(postgres_server):
    values = _env_example()
    init = {name: _expand(value) for name, value in _compose()["services"]["postgres-init"]["environment"].items()
            if not name.startswith("PG")}
    init.update(AIRFLOW_DB_PASSWORD=secrets.token_urlsafe(12), MLFLOW_DB_PASSWORD=secrets.token_urlsafe(12))
    env = {**os.environ, **postgres_server, **init}
    for _ in range(2):  # idempotent: the init job runs at every `docker compose up`
        run = subprocess.run(["bash", str(ROOT / "stack" / "postgres-init.sh")], env=env, capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, run.stderr

    def psql(user: str, password: str, database: str, sql: str) -> subprocess.CompletedProcess:
        return subprocess.run(["psql", "-d", database, "-tAc", sql], capture_output=True, text=True, timeout=60,
                              env={**env, "PGUSER": user, "PGPASSWORD": password})

    airflow = (values["AIRFLOW_DB_USER"], init["AIRFLOW_DB_PASSWORD"])
    mlflow = (values["MLFLOW_DB_USER"], init["MLFLOW_DB_PASSWORD"])
    for (user, password), own, others in ((airflow, [values["AIRFLOW_DB"]], [values["MLFLOW_DB"], values["MLFLOW_AUTH_DB"]]),
                                          (mlflow, [values["MLFLOW_DB"], values["MLFLOW_AUTH_DB"]], [values["AIRFLOW_DB"]])):
        for database in own:  # it migrates its own schema: creates tables there
            created = psql(user, password, database,
                           "CREATE TABLE probe (x int); DROP TABLE probe; "
                           "SELECT rolsuper, rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname = current_user")
            assert created.returncode == 0 and created.stdout.split()[-1] == "f|f|f", created.stderr
        for database in others:
            refused = psql(user, password, database, "SELECT 1")
            assert refused.returncode != 0 and "CONNECT" in refused.stderr, f"{user} reaches {database}"
        assert psql(user, "wrong-password", own[0], "SELECT 1").returncode != 0
