#!/bin/sh
# The bucket and one MinIO user per client, created by the `minio-init` service of
# docker-compose.yml with the root keys (which no other service gets). Idempotent: a rerun
# creates what is missing and resets each user's secret key to the one in the environment.
#
#   MINIO_MLFLOW_ACCESS_KEY / _SECRET_KEY  the MLflow server's artifact store: s3://$MINIO_BUCKET/mlflow/ only
#   MINIO_DVC_ACCESS_KEY / _SECRET_KEY     the DVC remote `stack` (.dvc/config): s3://$MINIO_BUCKET/dvc/ only
#
# Each user's policy allows listing its own prefix and reading, writing and deleting objects under
# it, nothing else (no other prefix, no bucket or admin operation).
set -eu
for var in MINIO_ROOT_USER MINIO_ROOT_PASSWORD MINIO_BUCKET MINIO_MLFLOW_ACCESS_KEY MINIO_MLFLOW_SECRET_KEY \
           MINIO_DVC_ACCESS_KEY MINIO_DVC_SECRET_KEY; do
  eval "value=\${$var:-}"
  if [ -z "$value" ]; then echo "minio-init: set $var (see .env.example)" >&2; exit 2; fi
done
if [ "$MINIO_MLFLOW_ACCESS_KEY" = "$MINIO_DVC_ACCESS_KEY" ] || [ "$MINIO_MLFLOW_ACCESS_KEY" = "$MINIO_ROOT_USER" ] \
   || [ "$MINIO_DVC_ACCESS_KEY" = "$MINIO_ROOT_USER" ]; then
  echo "minio-init: MLflow, DVC and the root need three different access keys" >&2; exit 2
fi

mc alias set stack http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null
mc mb --ignore-existing "stack/$MINIO_BUCKET"

user() {  # user ACCESS_KEY SECRET_KEY PREFIX: the user, with a policy on s3://$MINIO_BUCKET/PREFIX/ only
  policy="leanrec-$3"
  file="$(mktemp)"
  cat >"$file" <<JSON
{
  "Version": "2012-10-17",
  "Statement": [
    {"Effect": "Allow", "Action": ["s3:GetBucketLocation"], "Resource": ["arn:aws:s3:::$MINIO_BUCKET"]},
    {"Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": ["arn:aws:s3:::$MINIO_BUCKET"],
     "Condition": {"StringLike": {"s3:prefix": ["$3", "$3/*"]}}},
    {"Effect": "Allow",
     "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
                "s3:ListMultipartUploadParts"],
     "Resource": ["arn:aws:s3:::$MINIO_BUCKET/$3/*"]}
  ]
}
JSON
  mc admin policy create stack "$policy" "$file"
  rm -f "$file"
  mc admin user add stack "$1" "$2"
  # attach refuses a policy that is already attached: then the user has it, which is what we want.
  mc admin policy attach stack "$policy" --user "$1" \
    || mc admin user info stack "$1" | grep -q "$policy"
  echo "minio-init: $1 may use s3://$MINIO_BUCKET/$3/ only"
}

user "$MINIO_MLFLOW_ACCESS_KEY" "$MINIO_MLFLOW_SECRET_KEY" mlflow
user "$MINIO_DVC_ACCESS_KEY" "$MINIO_DVC_SECRET_KEY" dvc
