"""Check a tracking setup before using it: does it answer, which MLflow it is, may this login
read and write, does the artifact store keep what it is given.

Each check gives one line; a failed one says what to fix, and the checks after it that
depend on it are not run (no point testing writes against a server that does not answer).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mnistflow.store import remote


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    name: str
    ok: bool
    text: str


def _why(error: Exception, uri: str, what: str) -> str:
    """One sentence for a failed step: the server's refusal if it was one, else its text."""
    message = error.message if isinstance(error, MlflowException) else str(error)
    first_line = message.strip().splitlines()[0] if message.strip() else type(error).__name__
    return remote.sentence(error, uri) or f"Could not {what} at {uri}: {first_line[:300]}"


def _server_version(uri: str) -> Check:
    """GET /health, then /version (which a server with logins answers only to a login)."""
    import requests
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        health = requests.get(uri.rstrip("/") + "/health", timeout=10)
    except requests.RequestException as e:
        return Check(
            "server",
            False,
            f"Nothing answers at {uri} ({type(e).__name__}): start the tracking server or fix "
            "MLFLOW_TRACKING_URI.",
        )
    if health.status_code != 200 or health.text.strip() != "OK":
        return Check(
            "server",
            False,
            f"{uri}/health answered HTTP {health.status_code}, not an MLflow server's 'OK': "
            "check that MLFLOW_TRACKING_URI points at the tracking server itself.",
        )
    response = http_request(get_default_host_creds(uri), "/version", "GET", max_retries=0)
    if response.status_code != 200:
        sentence = remote.describe(response.status_code, "/version", uri)
        return Check("server", False, sentence or f"{uri}/version answered {response.status_code}.")
    return Check("server", True, f"{uri} answers: MLflow server {response.text.strip()}")


# A doctor answers in seconds (no retry loops over a broken server), in a few lines of
# verdicts (no download progress bar in between). A user's own settings win.
QUICK_REQUESTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def run_checks(tracking_uri: str, experiment: str) -> list[Check]:
    """The checks in order; stops at the first failure that the next checks depend on.

    The quick-request settings hold during the checks only: left in the environment, they
    took MLflow's retries away from whatever the process did next (a test's client met a
    server's closed keep-alive connection with no retry).
    """
    unset = [key for key in QUICK_REQUESTS if key not in os.environ]
    os.environ.update({key: QUICK_REQUESTS[key] for key in unset})
    try:
        return _checks(tracking_uri, experiment)
    finally:
        for key in unset:
            os.environ.pop(key, None)


def _checks(tracking_uri: str, experiment: str) -> list[Check]:
    uri = tracking_uri
    user = os.environ.get("MLFLOW_TRACKING_USERNAME") or "anonymous"
    checks: list[Check] = []
    if uri.startswith(("http://", "https://")):
        checks.append(_server_version(uri))
        if not checks[-1].ok:
            return checks
    else:
        checks.append(Check("store", True, f"{uri} is a local store (MLflow {mlflow.__version__})"))
    client = MlflowClient(uri)

    try:
        visible = client.search_experiments(max_results=100)
        checks.append(Check("read", True, f"{user} can read (experiments visible: {len(visible)})"))
    except Exception as e:
        checks.append(Check("read", False, _why(e, uri, "list experiments")))
        return checks

    try:
        found = client.get_experiment_by_name(experiment)
        experiment_id = (
            found.experiment_id if found is not None else client.create_experiment(experiment)
        )
        run = client.create_run(experiment_id, run_name="mnistflow doctor")
        client.set_tag(run.info.run_id, "mnistflow.doctor", "write check")
    except Exception as e:
        checks.append(Check("write", False, _why(e, uri, f"write to experiment {experiment!r}")))
        return checks
    run_id = run.info.run_id
    checks.append(
        Check("write", True, f"{user} can write to experiment {experiment!r} (a tagged run)")
    )

    token = secrets.token_hex(16)
    try:
        client.log_text(run_id, token, "mnistflow-doctor.txt")
        with tempfile.TemporaryDirectory() as folder:
            local = client.download_artifacts(run_id, "mnistflow-doctor.txt", folder)
            kept = Path(local).read_text() == token
        checks.append(
            Check(
                "artifacts",
                kept,
                f"{run.info.artifact_uri} accepted a small file and gave it back"
                if kept
                else f"{run.info.artifact_uri} gave back other bytes than it was given: "
                "check the artifact store's configuration.",
            )
        )
    except Exception as e:
        checks.append(
            Check("artifacts", False, _why(e, uri, f"write and read back {run.info.artifact_uri}"))
        )
    finally:
        # The scratch run leaves nothing visible behind (deleted runs are garbage collected).
        # The verdict above is what matters; a leftover scratch run is harmless.
        with contextlib.suppress(Exception):
            client.delete_run(run_id)
    return checks
