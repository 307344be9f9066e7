"""No secret given to a command ends up in anything its runs, study, spool, logs or output hold.

The fast tests check the pieces (config records, error sentences, the sweep's missing
driver). The stack tests run the real commands against the team stack (mnistflow.stack) as
a user whose password is in the tracking URI (``http://user:pass@host``, which MLflow's
client accepts) or in MLFLOW_TRACKING_PASSWORD, with a database password in the sweep's
storage URL and a token and a bucket key in the environment; then they grep, for each
secret, everything the commands left: every param, tag and artifact file of every run and
model (downloaded as that user), the server's whole database and bucket, the study's whole
database, the local spool and each command's stdout and stderr.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from conftest import MNISTFLOW, ROOT, as_user, free_port, run_cli, tool_env
from mnistflow.cli.output import KEPT_IN_SPOOL
from mnistflow.config import TrackingConfig
from mnistflow.recording import tracking_record
from mnistflow.store import remote

# One worker holds the team stack under pytest-xdist (make test): see conftest.py.
pytestmark = pytest.mark.xdist_group("team")

# -- the pieces, without a server ----------------------------------------------------------


def test_the_tracking_record_of_a_run_keeps_no_password():
    record = tracking_record(TrackingConfig(tracking_uri="https://ann:pw-123456@mlflow.example"))
    assert record["tracking_uri"] == "https://ann:***@mlflow.example"
    assert tracking_record(TrackingConfig())["tracking_uri"] is None


def test_refusal_sentences_show_the_server_without_its_password(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "ann")
    for status in (401, 403, 503):
        shown = remote.describe(status, "/api/2.0/mlflow/runs/create", "https://ann:pw-1234@h")
        assert shown is not None and "pw-1234" not in shown and "https://ann:***@h" in shown


def test_an_unreachable_server_is_named_without_its_password():
    port = free_port()
    uri = f"http://ann:pw-unreachable-1@127.0.0.1:{port}"
    result = run_cli("train", "--tracking-uri", uri, "--require-server", "--limit-train", "100")
    assert result.exit_code == 1
    assert f"http://ann:***@127.0.0.1:{port}" in result.stderr
    assert "pw-unreachable-1" not in result.stdout + result.stderr


def test_a_sweep_on_postgresql_without_the_driver_names_the_extra(tmp_path, monkeypatch):
    # As if psycopg were not installed: importing it fails.
    monkeypatch.setitem(sys.modules, "psycopg", None)
    result = run_cli(
        "sweep", "--storage", "postgresql://optuna:db-pw-4321@127.0.0.1:1/studies",
        "--trials", "1", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
    )  # fmt: skip
    assert result.exit_code == 1
    assert "pip install 'mnistflow[team]'" in result.stderr
    assert "PostgreSQL is running" not in result.stderr and "Traceback" not in result.stderr
    assert "db-pw-4321" not in result.stdout + result.stderr


# -- the real commands, on the team stack ---------------------------------------------------


def on_the_stack(test: Any) -> Any:
    """The markers of a test that runs on the team stack."""
    return pytest.mark.stack(pytest.mark.server(pytest.mark.slow(test)))


USER = "carol"
# Random, so that a hit can only be a leak of this very value.
PASSWORD = f"carol-pw-{secrets.token_hex(8)}"
DB_PASSWORD = f"db-pw-{secrets.token_hex(8)}"
ENV_SECRETS = {
    # Neither is needed here: the server proxies artifacts and the login is basic auth. They
    # are set as a user's shell may have them, and must not be copied anywhere.
    "AWS_SECRET_ACCESS_KEY": f"aws-secret-{secrets.token_hex(8)}",
    "MLFLOW_TRACKING_TOKEN": f"token-{secrets.token_hex(8)}",
}
SECRETS = [PASSWORD, DB_PASSWORD, *ENV_SECRETS.values()]


def leaks(text: str | bytes) -> list[str]:
    """The secrets found in text."""
    if isinstance(text, bytes):
        return [s for s in SECRETS if s.encode() in text]
    return [s for s in SECRETS if s in text]


def command(env: dict[str, str], folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`mnistflow ARGS` in a child with exactly env (plus PATH), as a user runs it."""
    return subprocess.run(
        [*MNISTFLOW, *args], env=env, cwd=folder, capture_output=True, text=True, timeout=900
    )


@pytest.fixture(scope="module")
def commands(team: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Train (login in the URI, then in the environment), sweep (database password in the
    storage URL), and train while the server is away then sync; every command's output."""
    from mnistflow.stack import team as stack

    team.add_user(USER, PASSWORD)
    folder = tmp_path_factory.mktemp("secrets")
    host = team.tracking_uri.removeprefix("http://")
    with_login = f"http://{USER}:{PASSWORD}@{host}"
    study_db = stack.create_database(team.database_uri, "secrets_study")
    storage = study_db.replace(
        "postgresql+psycopg://postgres@", f"postgresql://postgres:{DB_PASSWORD}@"
    )
    base = {
        **stack.client_free_env(tool_env()),
        **ENV_SECRETS,
        "MNISTFLOW_SPOOL_DIR": str(folder / "spool"),
    }
    login_env = {
        **base,
        "MLFLOW_TRACKING_URI": team.tracking_uri,
        "MLFLOW_TRACKING_USERNAME": USER,
        "MLFLOW_TRACKING_PASSWORD": PASSWORD,
    }
    small = ["--limit-train", "500", "--epochs", "1", "--no-system-metrics", "--json"]
    done: dict[str, subprocess.CompletedProcess[str]] = {}
    done["train-uri"] = command(
        base, folder, "train", "--tracking-uri", with_login, "--experiment", "secrets-uri",
        "--register", "--model-name", "secrets-model", *small,
    )  # fmt: skip
    done["train-env"] = command(login_env, folder, "train", "--experiment", "secrets-env", *small)
    done["sweep"] = command(
        base, folder, "sweep", "--tracking-uri", with_login, "--storage", storage,
        "--study", "secrets", "--trials", "2", "--epochs", "1", "--limit-train", "300",
        "--experiment", "secrets-sweep", "--no-system-metrics", "--json",
    )  # fmt: skip
    # The server stops answering (its whole process group paused): the run is kept in the
    # spool; once it answers again, `mnistflow sync` sends it.
    os.killpg(team.server.pid, signal.SIGSTOP)
    try:
        done["train-away"] = command(
            base, folder, "train", "--tracking-uri", with_login, "--experiment",
            "secrets-away", "--wait-for-server", "0", *small,
        )  # fmt: skip
    finally:
        os.killpg(team.server.pid, signal.SIGCONT)
    done["sync"] = command(base, folder, "sync", "--tracking-uri", with_login, "--json")
    for name, result in done.items():
        expected = KEPT_IN_SPOOL if name == "train-away" else 0
        assert result.returncode == expected, f"{name}: {result.stderr[-3000:]}"
    yield {"done": done, "folder": folder, "storage": storage, "study_db": study_db}


def all_files(folder: Path) -> Iterator[Path]:
    return (path for path in folder.rglob("*") if path.is_file())


@on_the_stack
def test_the_commands_worked_with_the_logins_they_were_given(team, commands):
    done = commands["done"]
    trained = json.loads(done["train-uri"].stdout.strip().splitlines()[-1])
    assert trained["registered_version"] == "1" and not trained["spooled"]
    assert (
        trained["tracking_uri"] == f"http://{USER}:***@{team.tracking_uri.removeprefix('http://')}"
    )
    away = json.loads(done["train-away"].stdout.strip().splitlines()[-1])
    assert away["spooled"]
    synced = json.loads(done["sync"].stdout.strip().splitlines()[-1])["synced"]
    assert [r["complete"] for r in synced] == [True]


@on_the_stack
def test_no_command_output_holds_a_secret(commands):
    for name, result in commands["done"].items():
        assert leaks(result.stdout) == [], f"{name} printed a secret on stdout"
        assert leaks(result.stderr) == [], f"{name} printed a secret on stderr"


@on_the_stack
def test_no_run_or_model_holds_a_secret(team, commands, tmp_path):
    """What every account with READ sees: each run's params, tags and artifact files (all
    downloaded), each logged model's and each model version's records and files."""
    with as_user(team, USER):
        client = MlflowClient()
        names = ["secrets-uri", "secrets-env", "secrets-sweep", "secrets-away"]
        experiments = [client.get_experiment_by_name(name) for name in names]
        assert all(experiments)
        ids = [e.experiment_id for e in experiments]
        runs = client.search_runs(ids)
        downloaded: set[str] = set()
        assert len(runs) >= 6  # two trainings, a parent and 2 trials, the synced run
        for e in experiments:
            assert leaks(json.dumps(e.tags)) == [], e.name
        for run in runs:
            record = json.dumps([run.data.params, run.data.tags, run.info.run_name])
            assert leaks(record) == [], f"run {run.info.run_id} {run.info.run_name}"
            into = tmp_path / run.info.run_id
            mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(into))
            for path in all_files(into):
                downloaded.add(path.name)
                assert leaks(path.read_bytes()) == [], f"{path.relative_to(tmp_path)}"
        assert {"config.json", "model.pt", "trials.csv"} <= downloaded
        models = client.search_logged_models(experiment_ids=ids)
        assert models
        for model in models:
            assert leaks(json.dumps([model.params, model.tags, model.name])) == []
            into = tmp_path / model.model_id
            mlflow.artifacts.download_artifacts(
                artifact_uri=model.artifact_location, dst_path=str(into)
            )
            for path in all_files(into):
                assert leaks(path.read_bytes()) == [], f"{path.relative_to(tmp_path)}"
        for version in client.search_model_versions("name='secrets-model'"):
            assert leaks(json.dumps([version.source, version.tags, version.description])) == []


def table_rows(database_uri: str) -> str:
    """Every row of every table of a PostgreSQL database, as text."""
    import psycopg

    plain = database_uri.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain) as connection:
        tables = connection.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchall()
        return "\n".join(
            str(connection.execute(f'SELECT * FROM "{name}"').fetchall()) for (name,) in tables
        )


@on_the_stack
def test_the_server_database_and_bucket_hold_no_secret(team, commands):
    """Whatever the tracking server stored, by any path: its whole database, every object in
    its bucket, and its log."""
    assert leaks(table_rows(team.database_uri)) == []
    s3 = team.s3_client()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=team.bucket):
        for item in page.get("Contents", []):
            body = s3.get_object(Bucket=team.bucket, Key=item["Key"])["Body"].read()
            assert leaks(body) == [], item["Key"]
    assert leaks(team.log.read_bytes()) == []


@on_the_stack
def test_the_study_holds_no_secret(commands):
    import optuna

    # Every table: the study's and trials' user and system attributes, params, values.
    rows = table_rows(commands["study_db"])
    assert "secrets" in rows  # the study is there
    assert leaks(rows) == []
    # And as Optuna hands them out.
    study = optuna.load_study(study_name="secrets", storage=commands["study_db"])
    assert study.user_attrs["parent_run_id"]
    assert leaks(json.dumps(study.user_attrs, default=str)) == []
    for trial in study.trials:
        shown = [trial.params, trial.user_attrs, trial.system_attrs]
        assert leaks(json.dumps(shown, default=str)) == []


@on_the_stack
def test_the_local_spool_holds_no_secret(commands):
    spool_files = list(all_files(commands["folder"] / "spool"))
    assert spool_files
    for path in spool_files:
        assert leaks(path.read_bytes()) == [], path.name


# -- the team stack's serve account (deploy/create_user.py) ---------------------------------


def create_user(
    url: str, username: str, password: str, admin_password: str
) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ["PATH"],
        "MNISTFLOW_SERVE_USERNAME": username,
        "MNISTFLOW_SERVE_PASSWORD": password,
        "MLFLOW_ADMIN_PASSWORD": admin_password,
    }
    return subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "create_user.py"), url],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def logs_in(url: str, username: str, password: str) -> bool:
    import requests

    api = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
    return requests.get(api, auth=(username, password), timeout=30).status_code == 200


@on_the_stack
def test_the_serve_account_job_does_not_need_the_admin_password_once_done(team):
    """Each `up` runs the job again: with a stale admin password (changed in the UI since) it
    still passes while the account logs in, and says which variable to fix when it must act."""
    url, user = team.tracking_uri, "serve-job"
    first, second = f"serve-{secrets.token_hex(8)}", f"serve-{secrets.token_hex(8)}"
    stale_admin = "an-admin-password-changed-since"
    created = create_user(url, user, first, team.admin_password)
    assert created.returncode == 0 and "created" in created.stdout, created.stderr
    again = create_user(url, user, first, stale_admin)
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr
    # MNISTFLOW_SERVE_PASSWORD changed in deploy/.env: that needs the admin's login.
    refused = create_user(url, user, second, stale_admin)
    assert refused.returncode == 1
    assert "MLFLOW_ADMIN_PASSWORD" in refused.stderr and "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert stale_admin not in refused.stderr and second not in refused.stderr
    changed = create_user(url, user, second, team.admin_password)
    assert changed.returncode == 0 and "set the password" in changed.stdout, changed.stderr
    assert logs_in(url, user, second)
