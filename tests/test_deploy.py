"""The compose stack for users (deploy/), checked by a real compose parser: Debian's
docker-compose, which `make test` installs. Nothing is started: there is no Docker here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from mnistflow.stack.team import tracking_server_args

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


def env_values(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of an env file, as docker-compose reads them."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    pairs = [line.split("=", 1) for line in lines if line and not line.startswith("#")]
    return {key: value for key, value in pairs}


EXAMPLE = env_values(DEPLOY / ".env.example")


def test_the_tracking_server_has_a_bucket_account_of_its_own(resolved):
    services = resolved["services"]
    for name, service in services.items():
        env = service.get("environment", {})
        if name == "mlflow":
            assert env["AWS_ACCESS_KEY_ID"] == EXAMPLE["MLFLOW_S3_ACCESS_KEY"]
            assert env["AWS_SECRET_ACCESS_KEY"] == EXAMPLE["MLFLOW_S3_SECRET_KEY"]
            assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
        else:
            assert "AWS_SECRET_ACCESS_KEY" not in env, name
    # MinIO's root account: MinIO itself, the set-up job and the check; never the server.
    root = {n for n, s in services.items() if "MINIO_ROOT_PASSWORD" in s.get("environment", {})}
    assert root == {"secrets", "minio", "minio-bucket"}
    assert EXAMPLE["MLFLOW_S3_ACCESS_KEY"] != EXAMPLE["MINIO_ROOT_USER"]
    serve = services["serve"]
    assert serve["environment"]["MLFLOW_TRACKING_USERNAME"] == "serve"
    assert "models:/mnist@champion" in serve["command"]
    # The bucket and the server's account are made before the server starts.
    assert services["mlflow"]["depends_on"]["minio-bucket"]["condition"] == (
        "service_completed_successfully"
    )
    bucket_job = services["minio-bucket"]
    assert bucket_job["environment"]["MLFLOW_S3_SECRET_KEY"] == EXAMPLE["MLFLOW_S3_SECRET_KEY"]
    assert "/minio-setup.sh" in " ".join(bucket_job["entrypoint"])


def fake_mc(folder: Path, attach_error: str) -> Path:
    """An `mc` that records its arguments (and the policy it is given) and answers an attach
    with attach_error, as a policy already attached makes mc releases before 2024-10 do."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    mc = bin_dir / "mc"
    mc.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {folder}/calls\n'
        'if [ "$2 $3" = "policy create" ]; then cp "$6" '
        f"{folder}/policy.json; fi\n"
        f'if [ "$2 $3" = "policy attach" ] && [ -e {folder}/attached ]; then\n'
        f'  echo "{attach_error}" >&2; exit 1\n'
        "fi\n"
        f'if [ "$2 $3" = "policy attach" ]; then touch {folder}/attached; fi\n'
    )
    mc.chmod(0o755)
    return bin_dir


@pytest.mark.parametrize(
    ("attach_error", "second_run_passes"),
    [
        ("mc: <ERROR> Unable to make user/group policy association. The specified policy "
         "change is already in effect. (Specified policy update has no net effect).", True),
        ("mc: <ERROR> Unable to attach the policy: Access Denied.", False),
    ],
)  # fmt: skip
@pytest.mark.slow
def test_the_bucket_job_makes_a_bucket_scoped_account_again_and_again(
    resolved, tmp_path, attach_error, second_run_passes
):
    job = resolved["services"]["minio-bucket"]
    env = {key: str(value) for key, value in job["environment"].items()}
    bin_dir = fake_mc(tmp_path, attach_error)
    env |= {"PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(tmp_path)}

    def setup() -> subprocess.CompletedProcess:
        script = DEPLOY / "minio-setup.sh"
        return subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True)

    first = setup()
    assert first.returncode == 0, first.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    bucket, user = env["MLFLOW_BUCKET"], env["MLFLOW_S3_ACCESS_KEY"]
    assert f"mb --ignore-existing local/{bucket}" in calls
    assert f"admin user add local {user} {env['MLFLOW_S3_SECRET_KEY']}" in calls
    assert f"admin policy attach local mlflow-artifacts --user {user}" in calls
    policy = json.loads((tmp_path / "policy.json").read_text())
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        assert all(a.startswith("s3:") and "*" not in a for a in statement["Action"])
        assert set(statement["Resource"]) <= {f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"}
    assert "s3:PutObject" in str(policy) and "s3:ListBucket" in str(policy)
    again = setup()  # the next `up`
    assert (again.returncode == 0) == second_run_passes, again.stderr
    if not second_run_passes:
        assert "Access Denied" in again.stderr


def test_the_server_runs_with_the_flags_the_tests_use():
    """The image's command line has the same server flags as mnistflow.stack's."""
    script = (DEPLOY / "mlflow-entrypoint.sh").read_text()
    flags = {arg for arg in tracking_server_args("db", "s3://b", 1) if arg.startswith("--")}
    for flag in flags:
        assert flag in script, flag
    assert "default_permission = READ" in script
    assert '"mlflow[auth]==3.17.2"' in (DEPLOY / "Dockerfile").read_text()


# Random-looking values of the lengths check-secrets.sh asks for.
GOOD = {
    "POSTGRES_PASSWORD": "pg-Vr8Qm2xLwT5nZk3",
    "MINIO_ROOT_USER": "minio-admin",
    "MINIO_ROOT_PASSWORD": "mr-Hq7Ls2Wd9Xc4Vb6",
    "MLFLOW_S3_ACCESS_KEY": "mlflow-server",
    "MLFLOW_S3_SECRET_KEY": "s3-Kp3Jt8Yr1Ne6Mf0",
    "MLFLOW_ADMIN_PASSWORD": "ad-Zx4Cv7Bn2Mq9",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "fk-" + "Qw3Er6Ty9Ui2Op5As8Df1Gh4Jk7Lz0X",
    "MNISTFLOW_SERVE_PASSWORD": "sv-Lp5Ok8Ij3Uh6",
    "MNISTFLOW_API_KEY": "",
}


def check_secrets(env: dict[str, object]) -> subprocess.CompletedProcess:
    """deploy/check-secrets.sh, as the `secrets` service runs it, with env only."""
    values = {key: "" if value is None else str(value) for key, value in env.items()}
    return subprocess.run(
        ["sh", str(DEPLOY / "check-secrets.sh")],
        env={"PATH": os.environ["PATH"], **values}, capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def waits_for(services: dict, name: str) -> set[str]:
    """Every service name started before name (its depends_on, transitively)."""
    before = set(services[name].get("depends_on", {}))
    for other in list(before):
        before |= waits_for(services, other)
    return before


def test_the_example_placeholders_are_refused_before_anything_starts(resolved):
    services = resolved["services"]
    # What compose hands the check is what the services get: the example's placeholders.
    check_env = services["secrets"]["environment"]
    refused = check_secrets(check_env)
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    named = {line.split()[0] for line in lines}
    placeholders = {key for key, value in EXAMPLE.items() if "change-me" in value}
    assert named == placeholders
    assert placeholders >= {"POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MLFLOW_ADMIN_PASSWORD"}
    for line in lines:  # one sentence each, naming the variable, never its value
        assert line.endswith(".") and line.count(". ") == 0 and "placeholder" in line
    assert not any(EXAMPLE[key] in refused.stderr for key in placeholders)
    # Nothing starts before the check has passed; it is a one-shot job.
    for name in set(services) - {"secrets"}:
        assert "secrets" in waits_for(services, name), f"{name} does not wait for the check"
    for name in ("postgres", "minio"):
        condition = services[name]["depends_on"]["secrets"]["condition"]
        assert condition == "service_completed_successfully"
    assert services["secrets"]["restart"] == "no"


def test_good_secrets_pass_and_short_or_shared_ones_are_named():
    assert set(GOOD) == set(EXAMPLE) - {"MLFLOW_BUCKET", "MLFLOW_WORKERS", "MLFLOW_ALLOWED_HOSTS",
                                        "MNISTFLOW_SERVE_USERNAME"}  # fmt: skip
    passed = check_secrets(GOOD)
    assert passed.returncode == 0, passed.stderr
    for key, weak in [
        ("MLFLOW_ADMIN_PASSWORD", "Adm1n-2026"),  # 10 characters
        ("MINIO_ROOT_PASSWORD", "minioadmin"),  # MinIO's own default
        ("MLFLOW_FLASK_SERVER_SECRET_KEY", "sixteen-chars-ok"),
        ("MNISTFLOW_API_KEY", "short-key"),  # may be empty, not short
        ("POSTGRES_PASSWORD", "ChangeMe-" + "x" * 20),
    ]:
        refused = check_secrets({**GOOD, key: weak})
        assert refused.returncode == 1
        assert refused.stderr.strip().splitlines() == [refused.stderr.strip()]  # one sentence
        assert refused.stderr.startswith(f"{key} in deploy/.env ")
        assert weak not in refused.stderr
    shared = check_secrets({**GOOD, "MLFLOW_S3_ACCESS_KEY": GOOD["MINIO_ROOT_USER"]})
    assert shared.returncode == 1 and shared.stderr.startswith("MLFLOW_S3_ACCESS_KEY ")


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
