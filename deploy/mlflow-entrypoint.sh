#!/bin/sh
# Writes the basic-auth config (its database URI holds a password, so it is made here from
# the environment rather than baked into the image), then starts the tracking server.
set -eu
umask 077
cat > /tmp/basic_auth.ini <<INI
[mlflow]
default_permission = READ
database_uri = postgresql+psycopg://mlflow:${POSTGRES_PASSWORD}@postgres:5432/mlflow_auth
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = 60
INI
export MLFLOW_AUTH_CONFIG_PATH=/tmp/basic_auth.ini
exec mlflow server \
    --backend-store-uri "postgresql+psycopg://mlflow:${POSTGRES_PASSWORD}@postgres:5432/mlflow" \
    --artifacts-destination "s3://${MLFLOW_BUCKET}/artifacts" \
    --serve-artifacts \
    --app-name basic-auth \
    --host 0.0.0.0 --port 5000 \
    --workers "${MLFLOW_WORKERS}" \
    --allowed-hosts "${MLFLOW_ALLOWED_HOSTS}"
