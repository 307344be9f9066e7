#!/bin/sh
# Run by the minio-bucket job with MinIO's root account: the artifact bucket, a policy that
# allows only that bucket, and the MLflow server's own account holding just that policy.
# Every step is a no-op (or an update) when done before, so each `up` may run it again: a
# changed MLFLOW_S3_SECRET_KEY or bucket name takes effect on the next `up`.
set -eu
mc alias set local http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null
mc mb --ignore-existing "local/$MLFLOW_BUCKET"

# What `mlflow server --artifacts-destination s3://BUCKET/...` does: list, read, write
# (multipart for large files) and delete objects in that bucket; nothing else anywhere.
policy=${TMPDIR:-/tmp}/mlflow-artifacts-policy.json
cat > "$policy" <<JSON
{
  "Version": "2012-10-17",
  "Statement": [
    {
      "Effect": "Allow",
      "Action": ["s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads"],
      "Resource": ["arn:aws:s3:::$MLFLOW_BUCKET"]
    },
    {
      "Effect": "Allow",
      "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject",
                 "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
      "Resource": ["arn:aws:s3:::$MLFLOW_BUCKET/*"]
    }
  ]
}
JSON
# create replaces a policy of the same name.
mc admin policy create local mlflow-artifacts "$policy"
# add sets the secret key of a user that exists already.
mc admin user add local "$MLFLOW_S3_ACCESS_KEY" "$MLFLOW_S3_SECRET_KEY"
# mc releases before October 2024 refuse to attach a policy the user has already.
if ! attached=$(mc admin policy attach local mlflow-artifacts --user "$MLFLOW_S3_ACCESS_KEY" 2>&1); then
    case $attached in
        *"already in effect"*) ;;
        *) echo "$attached" >&2; exit 1 ;;
    esac
fi
echo "bucket $MLFLOW_BUCKET is ready; $MLFLOW_S3_ACCESS_KEY may use it and nothing else"
