#!/usr/bin/env bash
# The production-like stack (docker-compose.yml) on one machine, for real:
#
#   .ci/stack.sh up      start dockerd if none runs, build images (stand-ins where no registry
#                        serves the base images), `compose up -d`, wait until every service is
#                        healthy (the model server excepted: it has nothing to serve before a champion)
#   .ci/stack.sh test    up, then tests/test_stack.py (the DAG run through Celery, the fault checks)
#   .ci/stack.sh down    compose down -v (volumes too), and stop dockerd if `up` started it
#   .ci/stack.sh wait    wait until the running stack's services are healthy again (the fault checks)
#   .ci/stack.sh evidence [LABEL]  keep what a failure needs before `down -v` removes it:
#                        .stack-cache/evidence/<time>-LABEL/ gets `compose ps -a`, every service's
#                        `compose logs` and the Airflow task logs (the airflow-home volume); prints where
#   .ci/stack.sh compose ARGS...   docker compose with this stack's files, env file and project name
#
# Settings (environment, all optional):
#   LEANREC_STACK_ENV        the compose .env file (default .stack-cache/stack.env, generated once
#                            from .env.example with random secrets; never committed)
#   LEANREC_STACK_STANDINS   auto (default: a stand-in for each base image that `docker pull` cannot
#                            get), always, never
#   LEANREC_STACK_TIMEOUT    seconds `up` waits for the services to be healthy (default 900)
#
# Stand-ins (stack/standins/, when the pull fails): a Debian bookworm root file system made by
# debootstrap (cached in .stack-cache/rootfs.tar) and `docker import`ed, and on it Debian's
# PostgreSQL 15 for postgres:16, redis-server 7.0 for redis:7.4, python3 3.11 for python:3.11-slim,
# and moto's S3 server (PyPI) for MinIO and its mc client. Which were used: .stack-cache/standins.txt.
# Wall times of each step: .stack-cache/timings.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
CACHE="$ROOT/.stack-cache"
mkdir -p "$CACHE"
ENV_FILE="${LEANREC_STACK_ENV:-$CACHE/stack.env}"
STANDINS_MODE="${LEANREC_STACK_STANDINS:-auto}"
TIMEOUT="${LEANREC_STACK_TIMEOUT:-900}"
PROJECT=leanrec-stack
DEBIAN_IMAGE=leanrec-standin/debian:bookworm
PYTHON_STANDIN=leanrec-standin/python:3.11
DEPS_IMAGE=leanrec-standin/python-deps:3.11
MOTO_VERSION=5.2.5

log() { echo "stack: $*" >&2; }

timed() {  # timed LABEL COMMAND...: run it, append its wall time to timings.txt
  local label="$1" start end
  shift
  start=$(date +%s)
  "$@"
  end=$(date +%s)
  echo "$label: $((end - start)) s" | tee -a "$CACHE/timings.txt" >&2
}

# ----------------------------------------------------------------------------- the engine

ensure_dockerd() {
  if docker info >/dev/null 2>&1; then return 0; fi
  [ "$(id -u)" = 0 ] || { log "no Docker engine answers and this is not root: cannot start dockerd"; exit 3; }
  if ! command -v dockerd >/dev/null; then
    log "installing docker.io (Debian)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
  fi
  log "starting dockerd (log: $CACHE/dockerd.log)"
  dockerd >"$CACHE/dockerd.log" 2>&1 &
  echo $! >"$CACHE/dockerd.pid"
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && return 0; sleep 1; done
  log "dockerd did not answer within 60 s:"; tail -20 "$CACHE/dockerd.log" >&2; exit 3
}

stop_dockerd_if_ours() {
  [ -f "$CACHE/dockerd.pid" ] || return 0
  local pid
  pid="$(cat "$CACHE/dockerd.pid")"
  if kill -0 "$pid" 2>/dev/null; then
    log "stopping the dockerd this script started (pid $pid)"
    kill -TERM "$pid"
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  fi
  rm -f "$CACHE/dockerd.pid"
}

compose_bin() {  # Compose v2 (docker compose) where installed, else Debian's docker-compose (v1)
  if docker compose version >/dev/null 2>&1; then echo "docker compose"
  elif command -v docker-compose >/dev/null; then echo docker-compose
  else
    [ "$(id -u)" = 0 ] || { log "neither docker compose nor docker-compose is installed"; exit 3; }
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null
    echo docker-compose
  fi
}

compose() {
  local files=(-f docker-compose.yml)
  [ -s "$CACHE/compose.standins.yml" ] && files+=(-f "$CACHE/compose.standins.yml")
  # No GPU runtime here: the gpu queue's worker runs on CPU (profile no-gpu, docker-compose.yml).
  local gpu=(--profile no-gpu)
  if docker info 2>/dev/null | grep -q 'Runtimes:.*nvidia'; then gpu=(); fi
  # shellcheck disable=SC2046
  $(compose_bin) --env-file "$ENV_FILE" -p "$PROJECT" "${files[@]}" "${gpu[@]}" "$@"
}

gpu_scale() { docker info 2>/dev/null | grep -q 'Runtimes:.*nvidia' || echo "--scale airflow-worker-gpu=0"; }

# ----------------------------------------------------------------------------- secrets

make_env() {
  [ -s "$ENV_FILE" ] && return 0
  log "writing $ENV_FILE: .env.example with random secrets and ports away from the usual ones"
  python3 - "$ENV_FILE" <<'PY'
import base64, os, re, secrets, sys
ports = {"AIRFLOW_PORT": "18080", "MLFLOW_PORT": "15000", "MINIO_PORT": "19000", "MINIO_CONSOLE_PORT": "19001",
         "MODEL_SERVER_PORT": "18000"}
out = []
for line in open(".env.example", encoding="utf-8").read().splitlines():
    name, sep, value = line.partition("=")
    if sep and not line.startswith("#"):
        if name == "AIRFLOW_FERNET_KEY":
            value = base64.urlsafe_b64encode(os.urandom(32)).decode()
        elif value.startswith("change-me"):
            value = secrets.token_urlsafe(24)
        value = ports.get(name, value)
        line = f"{name}={value}"
    out.append(line)
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
os.write(fd, ("\n".join(out) + "\n").encode())
PY
}

# ----------------------------------------------------------------------------- images

pull_or_standin() {  # pull_or_standin IMAGE: 0 when the real image is here (pulled), 1 when a stand-in is needed
  [ "$STANDINS_MODE" = always ] && return 1
  docker image inspect "$1" >/dev/null 2>&1 && return 0  # pulled before (stand-ins have other names)
  if timeout 120 docker pull -q "$1" >/dev/null 2>&1; then return 0; fi
  [ "$STANDINS_MODE" = never ] && { log "cannot pull $1 and LEANREC_STACK_STANDINS=never"; exit 4; }
  return 1
}

rootfs() {
  if [ ! -s "$CACHE/rootfs.tar" ]; then
    command -v debootstrap >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
    local dir="$CACHE/rootfs"
    rm -rf "$dir"
    debootstrap --variant=minbase --include=ca-certificates bookworm "$dir" http://deb.debian.org/debian >"$CACHE/debootstrap.log"
    rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
    tar -C "$dir" -cf "$CACHE/rootfs.tar.partial" . && mv "$CACHE/rootfs.tar.partial" "$CACHE/rootfs.tar"
    rm -rf "$dir"
  fi
  docker image inspect "$DEBIAN_IMAGE" >/dev/null 2>&1 \
    || docker import -m "leanrec-standin: debootstrap bookworm minbase" "$CACHE/rootfs.tar" "$DEBIAN_IMAGE" >/dev/null
}

build_standin() {  # build_standin TAG DOCKERFILE CONTEXT [ARGS...]
  local tag="$1" dockerfile="$2" context="$3"
  shift 3
  DOCKER_BUILDKIT=0 docker build -q -t "$tag" -f "$dockerfile" --label leanrec-standin=1 "$@" "$context" >/dev/null
}

python_standin() {
  local ctx="$CACHE/ctx-python"
  rm -rf "$ctx" && mkdir -p "$ctx/ca-certificates"
  # The host's locally added CAs (e.g. a TLS-intercepting proxy it trusts), so pip in the images reaches PyPI.
  cp /usr/local/share/ca-certificates/*.crt "$ctx/ca-certificates/" 2>/dev/null || true
  build_standin "$PYTHON_STANDIN" stack/standins/python.Dockerfile "$ctx" --build-arg "DEBIAN_IMAGE=$DEBIAN_IMAGE"
}

deps_image() {
  # A wheelhouse for the image's own interpreter (Debian's 3.11.2: environment markers differ from the
  # host's 3.11.x). The host's pip fills host-wheels first (its index finds the local CPU torch wheel, so no
  # CUDA torch); pip in the stand-in then resolves from it, taking from PyPI only what its markers add.
  local ctx="$CACHE/ctx-deps"
  mkdir -p "$ctx/host-wheels" "$ctx/wheels"
  echo host-wheels >"$ctx/.dockerignore"
  python3 - >"$ctx/requirements.txt" <<'PY'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["stack"] + ["setuptools>=68", "wheel"]))
PY
  grep -v '^--find-links' constraints.txt >"$ctx/constraints.txt"
  # Built before from the same requirements, pins and Dockerfile: nothing to do (no download).
  local key
  key="$(cat "$ctx/requirements.txt" "$ctx/constraints.txt" stack/standins/deps.Dockerfile | sha256sum | cut -c1-16)"
  if [ "$(docker image inspect -f '{{index .Config.Labels "leanrec.deps"}}' "$DEPS_IMAGE" 2>/dev/null)" = "$key" ]; then return 0; fi
  local pip="${LEANREC_STACK_PIP:-python3 -m pip}"
  [ -x "$ROOT/.venv/bin/pip" ] && pip="${LEANREC_STACK_PIP:-$ROOT/.venv/bin/pip}"
  $pip download -q -c "$ctx/constraints.txt" -r "$ctx/requirements.txt" -d "$ctx/host-wheels"
  docker run --rm -v "$ctx:/ctx" "$PYTHON_STANDIN" pip download -q --find-links /ctx/host-wheels \
    -c /ctx/constraints.txt -r /ctx/requirements.txt -d /ctx/wheels
  if ls "$ctx"/wheels/torch-* | grep -qv '+cpu'; then log "the wheelhouse holds a torch that is not the CPU build: stop"; exit 4; fi
  build_standin "$DEPS_IMAGE" stack/standins/deps.Dockerfile "$ctx" --build-arg "PYTHON_IMAGE=$PYTHON_STANDIN" --label "leanrec.deps=$key"
}

write_standin_override() {  # the compose override naming the stand-in images (only for those used)
  local out="$CACHE/compose.standins.yml"
  : >"$CACHE/standins.txt"
  echo "# generated by .ci/stack.sh: stand-in images for those no registry served" >"$out"
  echo "services:" >>"$out"
  if [ "$1" = 1 ]; then
    echo "postgres:16 -> leanrec-standin/postgres:15 (Debian bookworm postgresql-15)" >>"$CACHE/standins.txt"
    printf '  postgres:\n    image: leanrec-standin/postgres:15\n  postgres-init:\n    image: leanrec-standin/postgres:15\n' >>"$out"
  fi
  if [ "$2" = 1 ]; then
    echo "redis:7.4 -> leanrec-standin/redis:7.0 (Debian bookworm redis-server)" >>"$CACHE/standins.txt"
    printf '  redis:\n    image: leanrec-standin/redis:7.0\n' >>"$out"
  fi
  if [ "$3" = 1 ]; then
    echo "minio/minio + minio/mc -> leanrec-standin/s3:moto-$MOTO_VERSION (moto[server] from PyPI: in memory, no users or policies)" >>"$CACHE/standins.txt"
    cat >>"$out" <<YAML
  minio:
    image: leanrec-standin/s3:moto-$MOTO_VERSION
    command: ["moto_server", "-H", "0.0.0.0", "-p", "9000"]
    healthcheck:
      test: ["CMD", "python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9000/moto-api/', timeout=3)"]
  minio-init:
    image: leanrec-standin/s3:moto-$MOTO_VERSION
    entrypoint: ["python", "/usr/local/bin/leanrec-s3-init"]
    volumes:
      - ./stack/standins/s3-init.py:/usr/local/bin/leanrec-s3-init:ro
YAML
  fi
  if [ "$4" = 1 ]; then
    echo "python:3.11-slim -> $PYTHON_STANDIN (Debian bookworm python3 3.11), project images FROM $DEPS_IMAGE" >>"$CACHE/standins.txt"
  fi
}

images() {
  local pg=0 redis=0 s3=0 py=0
  pull_or_standin postgres:16 || pg=1
  pull_or_standin redis:7.4 || redis=1
  { pull_or_standin minio/minio:RELEASE.2025-09-07T16-13-09Z && pull_or_standin minio/mc:RELEASE.2025-08-13T08-35-41Z; } || s3=1
  pull_or_standin python:3.11-slim || py=1
  if [ $((pg + redis + s3 + py)) -gt 0 ]; then
    timed "rootfs (debootstrap, cached in .stack-cache/rootfs.tar) + docker import" rootfs
    timed "stand-in base images" build_base_standins "$pg" "$redis" "$s3" "$py"
  fi
  write_standin_override "$pg" "$redis" "$s3" "$py"
  local base=python:3.11-slim
  [ "$py" = 1 ] && base="$DEPS_IMAGE"
  timed "project images (dags/Dockerfile, mlflow/Dockerfile FROM $base)" build_project_images "$base"
  log "stand-ins used:"; sed 's/^/  /' "$CACHE/standins.txt" >&2
}

build_base_standins() {
  [ "$1" = 1 ] && build_standin leanrec-standin/postgres:15 stack/standins/postgres.Dockerfile stack/standins --build-arg "DEBIAN_IMAGE=$DEBIAN_IMAGE"
  [ "$2" = 1 ] && build_standin leanrec-standin/redis:7.0 stack/standins/redis.Dockerfile stack/standins --build-arg "DEBIAN_IMAGE=$DEBIAN_IMAGE"
  if [ "$3" = 1 ] || [ "$4" = 1 ]; then python_standin; fi
  [ "$3" = 1 ] && build_standin "leanrec-standin/s3:moto-$MOTO_VERSION" stack/standins/s3.Dockerfile stack/standins \
    --build-arg "PYTHON_IMAGE=$PYTHON_STANDIN" --build-arg "MOTO_VERSION=$MOTO_VERSION"
  [ "$4" = 1 ] && deps_image
  return 0
}

build_project_images() {
  DOCKER_BUILDKIT=0 docker build -q -t leanrec-airflow:local -f dags/Dockerfile --build-arg "BASE_IMAGE=$1" . >/dev/null
  DOCKER_BUILDKIT=0 docker build -q -t leanrec-mlflow:local --build-arg "BASE_IMAGE=$1" mlflow >/dev/null
}

# ----------------------------------------------------------------------------- up, wait, down

# Every service but the model server, which restarts until a champion exists (docker-compose.yml).
WAIT_FOR=(postgres postgres-init redis minio minio-init mlflow airflow-init airflow-apiserver airflow-scheduler
          airflow-dag-processor airflow-triggerer airflow-worker-cpu)

wait_healthy() {
  local deadline=$(( $(date +%s) + TIMEOUT )) services=("${WAIT_FOR[@]}")
  if docker info 2>/dev/null | grep -q 'Runtimes:.*nvidia'; then services+=(airflow-worker-gpu); else services+=(airflow-worker-gpu-on-cpu); fi
  while :; do
    local pending=() service id state
    for service in "${services[@]}"; do
      id="$(compose ps -q "$service" 2>/dev/null | head -1)"
      if [ -z "$id" ]; then pending+=("$service:absent"); continue; fi
      state="$(docker inspect -f '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}} {{.State.ExitCode}}' "$id")"
      case "$state" in
        "running healthy "*|"exited none 0") ;;
        "exited none "*) log "$service exited ($state):"; docker logs --tail 40 "$id" >&2; return 1 ;;
        *) pending+=("$service:${state// /,}") ;;
      esac
    done
    [ ${#pending[@]} -eq 0 ] && return 0
    if [ "$(date +%s)" -ge "$deadline" ]; then
      log "not healthy after ${TIMEOUT}s: ${pending[*]}"; compose ps >&2; return 1
    fi
    sleep 5
  done
}

up() {
  ensure_dockerd
  make_env
  : >"$CACHE/timings.txt"
  images
  # shellcheck disable=SC2046
  timed "compose up -d + wait until healthy" up_and_wait
  compose ps >&2
}

up_and_wait() {
  # shellcheck disable=SC2046
  compose up -d --no-build $(gpu_scale) >&2
  wait_healthy
}

evidence() {  # evidence [LABEL]: the stack's logs, kept in .stack-cache/evidence/ (not removed by `down`)
  docker info >/dev/null 2>&1 && [ -s "$ENV_FILE" ] || { log "evidence: no engine or no stack here"; return 0; }
  local filter=(--filter "label=com.docker.compose.project=$PROJECT")
  [ -n "$(docker ps -aq "${filter[@]}")" ] || { log "evidence: no container of $PROJECT"; return 0; }
  local dir
  dir="$CACHE/evidence/$(date -u +%Y%m%dT%H%M%SZ)-${1:-manual}"
  mkdir -p "$dir"
  docker ps -a "${filter[@]}" --format '{{.Names}}\t{{.Status}}' >"$dir/compose-ps.txt" 2>&1 || true
  compose logs --no-color --timestamps >"$dir/compose-logs.txt" 2>&1 || true
  # The task logs are on the airflow-home volume: copied from the api-server's container (running or not).
  local airflow
  airflow="$(docker ps -aq "${filter[@]}" --filter label=com.docker.compose.service=airflow-apiserver | head -1)"
  if [ -n "$airflow" ]; then docker cp "$airflow:/opt/airflow/logs" "$dir/airflow-logs" >/dev/null 2>&1 || true; fi
  log "evidence kept in $dir ($(du -sh "$dir" | cut -f1))"
  echo "$dir"
}

down() {
  if docker info >/dev/null 2>&1 && [ -s "$ENV_FILE" ]; then compose down -v --remove-orphans >&2 || true; fi
  stop_dockerd_if_ours
}

case "${1:-}" in
  up) up ;;
  test) up; LEANREC_STACK_UP=1 python3 -m pytest -q -p no:cacheprovider -m stack tests/test_stack.py ;;
  down) down ;;
  wait) wait_healthy ;;
  evidence) shift; evidence "${1:-manual}" ;;
  compose) shift; compose "$@" ;;
  *) echo "usage: $0 up | test | down | wait | evidence [LABEL] | compose ARGS..." >&2; exit 2 ;;
esac
