#!/bin/sh
# Refuses to start the stack with a placeholder or a short secret. The `secrets` service runs
# this first and every other service waits for it to succeed, so nothing (no database, no
# bucket, no server) ever starts with the example's values.
# Prints one sentence per refused variable (never its value) and exits 1; 0 when all pass.
set -u
refused=0

# check NAME MIN_LENGTH [optional]: an optional variable may be empty, not weak.
check() {
    name=$1
    min=$2
    eval "value=\${$name:-}"
    if [ -z "$value" ] && [ "${3:-}" = optional ]; then
        return 0
    fi
    lowered=$(printf '%s' "$value" | tr '[:upper:]' '[:lower:]')
    case $lowered in
        # The placeholders of .env.example (well-known defaults such as minioadmin are
        # caught by the length).
        *change-me* | *changeme* | *change_me*)
            echo "$name in deploy/.env is still a placeholder; set it to a random secret (openssl rand -base64 24 makes one) before starting the stack." >&2
            refused=1
            return 0
            ;;
    esac
    if [ "${#value}" -lt "$min" ]; then
        echo "$name in deploy/.env has ${#value} characters; use a random secret of at least $min (openssl rand -base64 24 makes one) before starting the stack." >&2
        refused=1
    fi
}

# 12 for the MLflow logins is MLflow's own minimum; 32 for the key that signs its forms.
check POSTGRES_PASSWORD 16
check MINIO_ROOT_PASSWORD 16
check MLFLOW_S3_SECRET_KEY 16
check MLFLOW_ADMIN_PASSWORD 12
check MLFLOW_FLASK_SERVER_SECRET_KEY 32
check MNISTFLOW_SERVE_PASSWORD 12
check MNISTFLOW_API_KEY 16 optional

# The tracking server's bucket account must not be MinIO's root account (see minio-setup.sh).
if [ -n "${MINIO_ROOT_USER:-}" ] && [ "${MLFLOW_S3_ACCESS_KEY:-}" = "$MINIO_ROOT_USER" ]; then
    echo "MLFLOW_S3_ACCESS_KEY in deploy/.env is MinIO's root user (MINIO_ROOT_USER); give the tracking server an account of its own." >&2
    refused=1
fi

if [ "$refused" -ne 0 ]; then
    exit 1
fi
echo "deploy/.env: every secret is set, long enough and no placeholder."
