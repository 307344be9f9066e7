"""Faults of the team stack: the bucket gone, S3 down, PostgreSQL down. Training goes on into
the local spool (nothing is lost; `mnistflow sync` sends it later), the command says in one
sentence what failed, and a run that had started on the server ends FAILED with that reason
while the server can still record it. One stack of its own, broken step by step."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import psycopg
import pytest
from mlflow.tracking import MlflowClient

from conftest import WRITER, as_user, run_cli
from mnistflow.stack import servers
from mnistflow.stack.team import TeamStack, team_stack

pytestmark = [
    pytest.mark.stack,
    pytest.mark.server,
    pytest.mark.slow,
    # Not in the "team" group: it starts a stack of its own (see fragile), which it breaks.
]
TRAIN = ["train", "--limit-train", "300", "--epochs", "1", "--no-system-metrics", "--json"]
# The server's store is broken, not away for a while: no point waiting at the end.
TRAIN += ["--wait-for-server", "0"]


@pytest.fixture(scope="module")
def fragile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TeamStack]:
    with team_stack(tmp_path_factory.mktemp("fragile-stack")) as running:
        running.add_user(WRITER, "alice-password-1")
        yield running


def train_fails(team: TeamStack, experiment: str) -> tuple[str, list]:
    """Run a short training as alice that the server cannot take; its one sentence and the
    server's runs. The run itself is kept in the spool."""
    with as_user(team, WRITER), pytest.MonkeyPatch.context() as mp:
        # One retry, not minutes of them against a server that answers 500 (MLflow's
        # default is 7 with doubling waits); one is needed for a connection the server reset.
        mp.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        result = run_cli(*TRAIN, "--experiment", experiment)
        assert result.exit_code == 75, result.stderr  # trained, kept in the spool
        assert result.json()["spooled"] is True
        assert "Traceback" not in result.stderr and "mnistflow sync" in result.stderr
        message = " ".join(result.stderr.split())
        try:
            client = MlflowClient()
            found = client.get_experiment_by_name(experiment)
            runs = client.search_runs([found.experiment_id]) if found else []
        except Exception:  # the store itself is down
            runs = []
    return message, runs


def stop_postgres(database_uri: str) -> None:
    plain = database_uri.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain) as connection:
        row = connection.execute("SHOW data_directory").fetchone()
    assert row is not None
    as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    pg_ctl = str(servers.postgres_bin() / "pg_ctl")
    subprocess.run([*as_owner, pg_ctl, "stop", "-D", row[0], "-m", "immediate"], check=True)


def test_bucket_missing_then_s3_down_then_postgres_down(fragile):
    s3 = fragile.s3_client()
    for item in s3.list_objects_v2(Bucket=fragile.bucket).get("Contents", []):
        s3.delete_object(Bucket=fragile.bucket, Key=item["Key"])
    s3.delete_bucket(Bucket=fragile.bucket)

    message, runs = train_fails(fragile, "no-bucket")
    assert "artifact store may be down or its bucket missing" in message, message
    assert [run.info.status for run in runs] == ["FAILED"]
    assert runs[0].data.params["train.epochs"] == "1"  # what was logged before is kept

    servers.stop(fragile.s3)
    message, runs = train_fails(fragile, "s3-down")
    assert "artifact store may be down" in message, message
    assert [run.info.status for run in runs] == ["FAILED"]

    stop_postgres(fragile.database_uri)
    message, runs = train_fails(fragile, "postgres-down")
    # The auth app's own database query fails first: the server drops the connection.
    assert "database may be down" in message or "database or artifact store" in message, message
