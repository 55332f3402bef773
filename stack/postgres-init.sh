#!/usr/bin/env bash
# One Postgres role and database per service, created by the `postgres-init` service of
# docker-compose.yml as the superuser (whose credentials no other service gets). Idempotent: a
# rerun creates what is missing and resets each role's password to the one in the environment.
#
#   AIRFLOW_DB_USER / AIRFLOW_DB_PASSWORD   owns AIRFLOW_DB (Airflow's metadata DB), nothing else
#   MLFLOW_DB_USER / MLFLOW_DB_PASSWORD     owns MLFLOW_DB (runs, model registry) and
#                                           MLFLOW_AUTH_DB (MLflow's users and permissions)
#
# The roles are NOSUPERUSER NOCREATEDB NOCREATEROLE; CONNECT on each database is revoked from
# PUBLIC, so a role reaches only its own databases.
set -euo pipefail
for var in AIRFLOW_DB AIRFLOW_DB_USER AIRFLOW_DB_PASSWORD MLFLOW_DB MLFLOW_AUTH_DB MLFLOW_DB_USER MLFLOW_DB_PASSWORD; do
  if [[ -z "${!var:-}" ]]; then echo "postgres-init: set $var (see .env.example)" >&2; exit 2; fi
done
if [[ "$AIRFLOW_DB_USER" == "$MLFLOW_DB_USER" || "$AIRFLOW_DB_USER" == "${PGUSER:-}" || "$MLFLOW_DB_USER" == "${PGUSER:-}" ]]; then
  echo "postgres-init: Airflow, MLflow and the superuser need three different roles" >&2; exit 2
fi

role() {  # role NAME PASSWORD: a login role without privileges, its password (re)set
  psql -v ON_ERROR_STOP=1 -d postgres -q -v name="$1" -v password="$2" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN', :'name') WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'name')\gexec
SELECT format('ALTER ROLE %I WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION PASSWORD %L', :'name', :'password')\gexec
SQL
}

database() {  # database NAME OWNER: owned by OWNER, no CONNECT for anyone else
  psql -v ON_ERROR_STOP=1 -d postgres -q -v name="$1" -v owner="$2" <<'SQL'
SELECT format('CREATE DATABASE %I OWNER %I', :'name', :'owner') WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'name')\gexec
SELECT format('ALTER DATABASE %I OWNER TO %I', :'name', :'owner')\gexec
SELECT format('REVOKE ALL ON DATABASE %I FROM PUBLIC', :'name')\gexec
SELECT format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO %I', :'name', :'owner')\gexec
SQL
}

role "$AIRFLOW_DB_USER" "$AIRFLOW_DB_PASSWORD"
role "$MLFLOW_DB_USER" "$MLFLOW_DB_PASSWORD"
database "$AIRFLOW_DB" "$AIRFLOW_DB_USER"
database "$MLFLOW_DB" "$MLFLOW_DB_USER"
database "$MLFLOW_AUTH_DB" "$MLFLOW_DB_USER"
echo "postgres-init: role $AIRFLOW_DB_USER owns $AIRFLOW_DB; role $MLFLOW_DB_USER owns $MLFLOW_DB and $MLFLOW_AUTH_DB"
