#!/usr/bin/env bash
# Start an MLflow tracking server for LeanRec.
#
#   MLFLOW_BACKEND_STORE_URI   where runs and the model registry live
#                              (default: sqlite:///mlflow-server.db in the current directory)
#   MLFLOW_ARTIFACTS_DESTINATION  where the server stores artifacts it proxies
#                              (default: ./mlflow-artifacts; s3://bucket/path with an object store)
#   MLFLOW_HOST / MLFLOW_PORT  bind address (default 127.0.0.1:5000: loopback only)
#   MLFLOW_ALLOWED_HOSTS       extra Host headers to accept, e.g. "mlflow:5000" inside compose
#                              (MLflow's DNS-rebinding guard otherwise allows localhost and private IPs)
#
# Clients then set MLFLOW_TRACKING_URI=http://HOST:PORT and LeanRec logs there.
set -euo pipefail
extra=()
if [[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]]; then
  extra+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
fi
exec mlflow server \
  --backend-store-uri "${MLFLOW_BACKEND_STORE_URI:-sqlite:///mlflow-server.db}" \
  --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION:-./mlflow-artifacts}" \
  --serve-artifacts \
  --host "${MLFLOW_HOST:-127.0.0.1}" \
  --port "${MLFLOW_PORT:-5000}" \
  "${extra[@]}"
