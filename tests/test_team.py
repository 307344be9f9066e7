"""The team setup end to end: mnistflow against PostgreSQL + S3 + an MLflow server with
logins (mnistflow.stack), as a writer (alice), a read-only user (bob) and anonymous."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from typing import Any

import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from conftest import MNISTFLOW, READER, WRITER, as_user, free_port, run_cli, user_env
from mnistflow.lifecycle import registry
from mnistflow.stack.team import TeamStack
from mnistflow.store import remote

# One worker holds the team stack under pytest-xdist (make test): see conftest.py.
pytestmark = [
    pytest.mark.stack,
    pytest.mark.server,
    pytest.mark.slow,
    pytest.mark.xdist_group("team"),
]


@pytest.fixture(scope="module")
def team_run(team: TeamStack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`mnistflow pipeline` as alice, in a child whose environment holds no bucket credentials."""
    folder = tmp_path_factory.mktemp("team-client")
    env = user_env(team, WRITER)
    assert not [k for k in env if k.startswith("AWS_") or "S3" in k]
    done = subprocess.run(
        [*MNISTFLOW, "pipeline", "--limit-train", "2000", "--epochs", "1",
         "--min-accuracy", "0.5", "--min-writers-accuracy", "0.5", "--json"],
        env=env, cwd=folder, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return {"result": json.loads(done.stdout.strip().splitlines()[-1]), "folder": folder}


def bucket_keys(team: TeamStack, prefix: str) -> set[str]:
    pages = (
        team.s3_client()
        .get_paginator("list_objects_v2")
        .paginate(Bucket=team.bucket, Prefix=prefix)
    )
    return {item["Key"].removeprefix(prefix) for page in pages for item in page.get("Contents", [])}


def artifact_files(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    files: set[str] = set()
    for item in client.list_artifacts(run_id, path):
        files |= artifact_files(client, run_id, item.path) if item.is_dir else {item.path}
    return files


def test_pipeline_as_a_user_keeps_every_artifact_and_model_in_the_bucket(team, team_run):
    train = team_run["result"]["train"]
    promotion = team_run["result"]["promotion"]
    assert promotion["promoted"] and promotion["champion_version"] == "1"
    # Proxied: the client was handed the server's artifact scheme, never an s3:// URI.
    assert train["artifact_uri"].startswith("mlflow-artifacts:/")
    assert not (team_run["folder"] / "mlruns").exists()
    with as_user(team, WRITER):
        client = MlflowClient()
        run = client.get_run(train["run_id"])
        assert run.info.status == "FINISHED"
        run_prefix = f"artifacts/{run.info.experiment_id}/{run.info.run_id}/artifacts/"
        logged = artifact_files(client, run.info.run_id)
        assert {"config.json", "weights/model.pt", "reports/confusion_matrix.png"} <= logged
        assert logged == bucket_keys(team, run_prefix)
        models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
        assert len(models) >= 2  # the served ONNX pyfunc and the pytorch flavour
        for model in models:
            prefix = f"artifacts/{run.info.experiment_id}/models/{model.model_id}/artifacts/"
            assert "MLmodel" in bucket_keys(team, prefix), model.name
        # The promotion's evaluation run wrote its reports through the server as well.
        evaluation = client.get_run(promotion["evidence"][0]["run_id"])
        prefix = f"artifacts/{evaluation.info.experiment_id}/{evaluation.info.run_id}/artifacts/"
        assert artifact_files(client, evaluation.info.run_id) == bucket_keys(team, prefix) != set()
        champion = client.get_model_version_by_alias("mnist", "champion")
        assert champion.version == "1" and champion.run_id == run.info.run_id


def test_anonymous_and_wrong_passwords_are_refused_in_one_sentence(team, team_run):
    run_id = team_run["result"]["train"]["run_id"]
    api = f"{team.tracking_uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(api, timeout=30).status_code == 401
    assert requests.get(api, auth=(WRITER, "not-it"), timeout=30).status_code == 401
    with as_user(team, None):
        anonymous = run_cli("register", run_id)
    assert anonymous.exit_code == 1
    assert "needs a login (HTTP 401)" in anonymous.stderr
    assert "MLFLOW_TRACKING_USERNAME" in anonymous.stderr
    with as_user(team, WRITER, password="not-it"):
        wrong = run_cli("register", run_id)
    assert wrong.exit_code == 1
    assert f"refused the login of '{WRITER}' (HTTP 401)" in wrong.stderr
    assert "Traceback" not in anonymous.stderr + wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) <= 3  # one sentence, soft-wrapped at most


def test_read_only_user_cannot_register_or_move_aliases(team, team_run):
    run_id = team_run["result"]["train"]["run_id"]
    with as_user(team, READER):
        client = MlflowClient()
        assert client.get_run(run_id).info.status == "FINISHED"  # reading is allowed
        refused = run_cli("register", run_id)
        assert refused.exit_code == 1
        assert f"User '{READER}' may not register model versions" in refused.stderr
        assert "HTTP 403" in refused.stderr and "Traceback" not in refused.stderr
        with pytest.raises(MlflowException) as moved:
            registry.make_champion(client, "mnist", "1", "bob tries")
        assert remote.status_of(moved.value) == (403, "/api/2.0/mlflow/registered-models/alias")
        assert "may not move model aliases" in str(remote.sentence(moved.value, "x"))
        refused = run_cli("promote", "--version", "1", "--min-accuracy", "0")
        assert refused.exit_code == 1 and "HTTP 403" in refused.stderr
        refused = run_cli("train", "--limit-train", "100", "--epochs", "1", "--no-system-metrics")
        assert refused.exit_code == 1 and f"User '{READER}' may not start runs" in refused.stderr
    with as_user(team, WRITER):
        assert MlflowClient().get_model_version_by_alias("mnist", "champion").version == "1"


def served_version(url: str) -> str | None:
    with contextlib.suppress(requests.RequestException):
        response = requests.get(f"{url}/version", timeout=5)
        if response.ok:
            return str(response.json()["version"])
    return None


def test_serve_with_a_read_only_login_follows_champion(team, team_run, spawn):
    run_id = team_run["result"]["train"]["run_id"]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = spawn(
        [*MNISTFLOW, "serve", "--port", str(port), "--poll-seconds", "0.5"],
        env=user_env(team, READER),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    with as_user(team, WRITER):
        client = MlflowClient()
        before = client.get_model_version_by_alias("mnist", "champion").version
        deadline = time.monotonic() + 180
        while served_version(url) != before:
            assert server.poll() is None and time.monotonic() < deadline, "never served"
            time.sleep(0.5)
        newer = registry.register(client, run_id, "mnist").version
        registry.make_champion(client, "mnist", str(newer), "the serve test")
        try:
            deadline = time.monotonic() + 120
            while served_version(url) != str(newer):
                assert server.poll() is None and time.monotonic() < deadline, "did not follow"
                time.sleep(0.5)
            digits = {"pixels": [[[0.0] * 28] * 28]}
            answer = requests.post(f"{url}/predict", json=digits, timeout=30)
            assert answer.status_code == 200, answer.text
            assert answer.json()["model"]["version"] == str(newer)
        finally:
            # Leave @champion where the other tests expect it, whatever order they run in.
            registry.make_champion(client, "mnist", before, "the serve test is over")


def test_doctor_reports_each_check(team, team_run):
    with as_user(team, WRITER):
        ok = run_cli("doctor")
    assert ok.exit_code == 0, ok.stdout + ok.stderr
    assert "MLflow server 3." in ok.stdout
    for line in ("ok   read", "ok   write", "ok   artifacts"):
        assert line in ok.stdout
    with as_user(team, READER):
        reader = run_cli("doctor")
    assert reader.exit_code == 1
    assert "ok   read" in reader.stdout and "FAIL write" in reader.stdout
    assert "HTTP 403" in reader.stdout
    with as_user(team, None):
        anonymous = run_cli("doctor")
    assert anonymous.exit_code == 1 and "needs a login (HTTP 401)" in anonymous.stdout
