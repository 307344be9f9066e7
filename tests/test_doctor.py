"""`mnistflow doctor` on a local store, and the sentences for a tracking server's refusals
(the team stack's end-to-end tests check both against a real server with logins)."""

from __future__ import annotations

import os

import pytest
import requests
from mlflow.exceptions import MlflowException, RestException
from mlflow.protos.databricks_pb2 import ErrorCode

from conftest import free_port, run_cli
from mnistflow.store import remote


@pytest.mark.slow
def test_doctor_passes_on_a_local_store(store):
    result = run_cli("doctor", "--tracking-uri", store, "--experiment", "doctor-check")
    assert result.exit_code == 0, result.stdout + result.stderr
    assert f"{store} is a local store" in result.stdout
    for line in ("ok   read", "ok   write", "ok   artifacts"):
        assert line in result.stdout


@pytest.mark.slow
def test_doctor_says_when_nothing_answers(monkeypatch):
    # Its quick-request settings hold during the checks only, and a user's own win.
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    uri = f"http://127.0.0.1:{free_port()}"
    result = run_cli("doctor", "--tracking-uri", uri)
    assert result.exit_code == 1
    assert f"FAIL server    Nothing answers at {uri}" in " ".join(result.stdout.split("\n"))
    assert "read" not in result.stdout  # the checks that need a server are not run
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"


def reply(status: int, endpoint: str) -> MlflowException:
    """The exception MLflow's client raises for a plain-text (non-JSON) error reply."""
    return MlflowException(
        f"API request to endpoint {endpoint} failed with error code {status} != 200. "
        "Response body: 'Permission denied'"
    )


@pytest.mark.parametrize(
    ("error", "user", "expected"),
    [
        (reply(401, "/api/2.0/mlflow/runs/get"), None, "needs a login (HTTP 401)"),
        (reply(401, "/api/2.0/mlflow/runs/get"), "eve", "refused the login of 'eve'"),
        (
            reply(403, "/api/2.0/mlflow/model-versions/create"),
            "bob",
            "User 'bob' may not register model versions",
        ),
        (
            reply(403, "/api/2.0/mlflow/registered-models/alias"),
            "bob",
            "may not move model aliases",
        ),
        (
            RestException({"error_code": "INTERNAL_ERROR", "message": "db gone"}),
            "bob",
            "failed (HTTP 500): its database or artifact store may be down",
        ),
        (
            MlflowException(
                "API request to http://h/api/2.0/mlflow-artifacts/artifacts/1/x failed with "
                "exception HTTPConnectionPool(...): Connection reset by peer"
            ),
            "bob",
            "could not store or fetch an artifact",
        ),
    ],
)
def test_refusals_become_one_sentence(monkeypatch, error, user, expected):
    if user is None:
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    # Wrapped as our commands wrap it: the refusal is found along the chain of causes.
    try:
        try:
            raise error
        except MlflowException as e:
            raise RuntimeError("No run with id x.") from None if user == "eve" else e
    except RuntimeError as wrapped:
        said = remote.sentence(wrapped, "http://server:5000")
    assert said is not None and expected in said
    assert said.count(". ") == 0 and said.endswith(".")  # one sentence


def test_other_errors_are_left_alone():
    assert remote.sentence(ValueError("no"), "x") is None
    missing = RestException({"error_code": ErrorCode.Name(ErrorCode.RESOURCE_DOES_NOT_EXIST)})
    assert remote.sentence(missing, "x") is None
    assert remote.sentence(requests.ConnectionError("refused"), "x") is None
