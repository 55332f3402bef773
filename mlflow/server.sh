#!/usr/bin/env bash
# Start an MLflow tracking server for LeanRec, with MLflow's basic-auth app (login required).
#
# Anyone who can register a version or move an alias of the served model makes the model server
# and the workers unpickle its code, so the server never runs without authentication.
#
#   MLFLOW_AUTH_ADMIN_PASSWORD    required (a secret, never in the repo): the password of the admin
#                                 user, created on the first start; the server refuses to start without it
#   MLFLOW_AUTH_ADMIN_USERNAME    the admin user (default admin)
#   LEANREC_MLFLOW_WORKER_PASSWORD   required: the workers' user (default name leanrec-worker,
#                                 LEANREC_MLFLOW_WORKER_USERNAME): logs runs, registers, moves aliases
#   LEANREC_MLFLOW_READER_PASSWORD   required: the people's read-only user (default name leanrec-reader,
#                                 LEANREC_MLFLOW_READER_USERNAME), and the model server's if it has none
#   LEANREC_MLFLOW_SERVING_PASSWORD  optional: the model server's own read-only user (default name
#                                 leanrec-serving, LEANREC_MLFLOW_SERVING_USERNAME)
#   LEANREC_MLFLOW_EXPERIMENT / LEANREC_MLFLOW_MODEL  what the worker owns (default leanrec / leanrec:
#                                 params.yaml tracking.experiment and registry.model_name)
#   MLFLOW_AUTH_DATABASE_URI      users and permissions (default sqlite:///mlflow-auth.db here)
#   MLFLOW_FLASK_SERVER_SECRET_KEY  the auth app's CSRF key (default: a new random one per start)
#   MLFLOW_BACKEND_STORE_URI      where runs and the model registry live
#                                 (default: sqlite:///mlflow-server.db in the current directory)
#   MLFLOW_ARTIFACTS_DESTINATION  where the server stores artifacts it proxies
#                                 (default: ./mlflow-artifacts; s3://bucket/path with an object store)
#   MLFLOW_HOST / MLFLOW_PORT     bind address (default 127.0.0.1:5000: loopback only)
#   MLFLOW_ALLOWED_HOSTS          extra Host headers to accept, e.g. "mlflow:5000" inside compose
#                                 (MLflow's DNS-rebinding guard otherwise allows localhost and private IPs)
#
# Once the server answers, mlflow/bootstrap_users.py (as the admin) creates or updates the users and
# their permissions (mlflow/README.md); the server stops if that fails. Clients then set
# MLFLOW_TRACKING_URI=http://HOST:PORT plus MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.
set -euo pipefail

require() {  # require VAR: refuse to start without it
  if [[ -z "${!1:-}" ]]; then
    echo "refusing to start the MLflow server: set $1 (a secret; see mlflow/README.md)" >&2
    exit 2
  fi
}
require MLFLOW_AUTH_ADMIN_PASSWORD
require LEANREC_MLFLOW_WORKER_PASSWORD
require LEANREC_MLFLOW_READER_PASSWORD

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="$(command -v python3 || command -v python)"
host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
export MLFLOW_AUTH_ADMIN_USERNAME="${MLFLOW_AUTH_ADMIN_USERNAME:-admin}"
if [[ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]]; then
  MLFLOW_FLASK_SERVER_SECRET_KEY="$("$python" -c 'import secrets; print(secrets.token_hex(32))')"
  export MLFLOW_FLASK_SERVER_SECRET_KEY
fi

# The auth app's configuration: no password in it (MLflow reads MLFLOW_AUTH_ADMIN_PASSWORD), and
# READ for every logged-in user on what nobody granted them more on.
config="$(mktemp -t leanrec-basic-auth.XXXXXX.ini)"
chmod 600 "$config"
cat >"$config" <<EOF
[mlflow]
default_permission = READ
database_uri = ${MLFLOW_AUTH_DATABASE_URI:-sqlite:///mlflow-auth.db}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
grant_default_workspace_access = false
EOF
export MLFLOW_AUTH_CONFIG_PATH="$config"

extra=()
if [[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]]; then
  extra+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
fi
mlflow server \
  --app-name basic-auth \
  --backend-store-uri "${MLFLOW_BACKEND_STORE_URI:-sqlite:///mlflow-server.db}" \
  --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION:-./mlflow-artifacts}" \
  --serve-artifacts \
  --host "$host" \
  --port "$port" \
  "${extra[@]}" &
server=$!
trap 'kill -TERM "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -f "$config"' EXIT
trap 'exit 143' TERM INT

# The bootstrap talks to the server on loopback when it listens on every interface.
case "$host" in
  0.0.0.0|::|"[::]") local_host=127.0.0.1 ;;
  *:*) local_host="[$host]" ;;
  *) local_host="$host" ;;
esac
MLFLOW_TRACKING_URI="http://$local_host:$port" "$python" "$here/bootstrap_users.py" --wait-pid "$server"
wait "$server"
