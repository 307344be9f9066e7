"""The compose stack for users (deploy/), checked by a real compose parser: Debian's
docker-compose, which `make test` installs. Nothing is started: there is no Docker here."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from mnistflow.stack import tracking_server_args

DEPLOY = ROOT / "deploy"
COMPOSE = shutil.which("docker-compose")
pytestmark = pytest.mark.skipif(
    COMPOSE is None, reason="docker-compose is not installed (make team-tools installs it)"
)


def compose(*args: str, env_file: Path = DEPLOY / ".env.example") -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(COMPOSE), "-f", str(DEPLOY / "docker-compose.yml"), "--env-file", str(env_file),
         *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.fixture(scope="module")
def resolved() -> dict:
    """The compose file as docker-compose reads it, with the example's values filled in."""
    checked = compose("config", "-q")
    assert checked.returncode == 0, checked.stderr
    shown = compose("config")
    assert shown.returncode == 0, shown.stderr
    return yaml.safe_load(shown.stdout)


def test_images_are_pinned_and_services_have_health_checks(resolved):
    services = resolved["services"]
    assert set(services) >= {"postgres", "minio", "minio-bucket", "mlflow", "serve"}
    for name, service in services.items():
        image = service["image"]
        tag = image.rpartition(":")[2]
        assert ":" in image and tag not in ("latest", ""), f"{name}: {image} is not pinned"
        if service.get("restart") != "no":  # the one-shot set-up jobs need none
            assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
    assert set(resolved["volumes"]) == {"postgres-data", "minio-data"}
    assert "postgres-data:/var/lib/postgresql/data" in str(services["postgres"]["volumes"])


def test_only_the_tracking_server_holds_the_bucket_keys(resolved):
    services = resolved["services"]
    for name, service in services.items():
        env = service.get("environment", {})
        if name == "mlflow":
            assert env["AWS_SECRET_ACCESS_KEY"] == "change-me-minio-at-least-8"
            assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
        else:
            assert "AWS_SECRET_ACCESS_KEY" not in env, name
    serve = services["serve"]
    assert serve["environment"]["MLFLOW_TRACKING_USERNAME"] == "serve"
    assert "models:/mnist@champion" in serve["command"]
    # The bucket is made before the server starts; the server waits for PostgreSQL.
    assert services["mlflow"]["depends_on"]["minio-bucket"]["condition"] == (
        "service_completed_successfully"
    )
    assert "mc mb --ignore-existing" in " ".join(services["minio-bucket"]["entrypoint"])


def test_the_server_runs_with_the_flags_the_tests_use():
    """The image's command line has the same server flags as mnistflow.stack's."""
    script = (DEPLOY / "mlflow-entrypoint.sh").read_text()
    flags = {arg for arg in tracking_server_args("db", "s3://b", 1) if arg.startswith("--")}
    for flag in flags:
        assert flag in script, flag
    assert "default_permission = READ" in script
    assert '"mlflow[auth]==3.17.2"' in (DEPLOY / "Dockerfile").read_text()


def test_missing_secrets_are_refused_and_the_real_env_is_ignored(tmp_path):
    empty = tmp_path / ".env"
    empty.write_text("MLFLOW_BUCKET=mlflow\n")
    refused = compose("config", "-q", env_file=empty)
    assert refused.returncode != 0
    assert "set POSTGRES_PASSWORD in deploy/.env" in refused.stderr
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "deploy/.env"], cwd=ROOT, capture_output=True
    )
    assert ignored.returncode == 0, "deploy/.env must be git-ignored"
