"""What a tracking server's refusals mean, in one sentence each.

A server with logins answers 401 (no or wrong login) and 403 (the login may not do this);
a server whose database or bucket is down answers 5xx. MLflow's client turns each into an
MlflowException whose text ends in the server's reply; every mnistflow command passes it
through sentence() so the user reads what happened and what to fix, not a traceback.
"""

from __future__ import annotations

import os
import re

from mlflow.exceptions import MlflowException, RestException

# MLflow's text for a reply that is not its JSON error (the auth app's plain-text refusals).
_REPLY = re.compile(r"endpoint (?P<endpoint>\S+) failed with error code (?P<status>\d{3})")

# MLflow's text when no reply came at all (connection refused or reset, after its retries).
_NO_REPLY = re.compile(r"API request to (?P<url>\S+) failed with (?:timeout )?exception")

# What an endpoint does, for "may not <action>"; longest match first.
_ACTIONS = (
    ("model-versions/create", "register model versions"),
    ("registered-models/alias", "move model aliases"),
    ("registered-models/create", "create registered models"),
    ("registered-models", "change registered models"),
    ("experiments/create", "create experiments"),
    ("runs/create", "start runs"),
    ("artifacts", "write artifacts"),
    ("logged-models", "log models"),
    ("runs/", "write to runs"),
)


def status_of(error: BaseException) -> tuple[int, str] | None:
    """(HTTP status, endpoint) of the tracking server's refusal behind error, if it is one.

    Follows the chain of causes, so an error raised while handling a refusal is recognised.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, RestException):
            return current.get_http_status_code(), ""
        if isinstance(current, MlflowException):
            found = _REPLY.search(current.message)
            if found:
                return int(found["status"]), found["endpoint"]
        # requests' HTTPError, raised by MLflow's artifact uploads and downloads
        response = getattr(current, "response", None)
        status = getattr(response, "status_code", None)
        if isinstance(status, int):
            return status, str(getattr(response, "url", ""))
        current = current.__cause__ or current.__context__
    return None


def sentence(error: BaseException, tracking_uri: str) -> str | None:
    """One sentence for a 401, 403 or 5xx from the tracking server, or for a request it broke
    off; None for anything else."""
    found = status_of(error)
    if found is not None:
        return describe(found[0], found[1], tracking_uri)
    url = _broken_off(error)
    if url is None:
        return None
    if "/mlflow-artifacts/" in url:
        # The server answers an upload it cannot store with 500 before reading the body,
        # which the client sees as a reset connection.
        return (
            f"The MLflow server at {tracking_uri} could not store or fetch an artifact "
            f"({url.split('?')[0]}): its artifact store may be down or its bucket missing; "
            "see the server's log."
        )
    return (
        f"The MLflow server at {tracking_uri} broke off a request ({url.split('?')[0]}): it or "
        "its database may be down; see the server's log, then run the command again."
    )


def _broken_off(error: BaseException) -> str | None:
    """The URL of a request that got no reply at all, found along error's chain of causes."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, MlflowException):
            found = _NO_REPLY.search(current.message)
            if found:
                return found["url"]
        current = current.__cause__ or current.__context__
    return None


def describe(status: int, endpoint: str, tracking_uri: str) -> str | None:
    """One sentence for the tracking server's HTTP status on endpoint; None if not a refusal."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if status == 401 and not user:
        return (
            f"The MLflow server at {tracking_uri} needs a login (HTTP 401): set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to your account."
        )
    if status == 401:
        return (
            f"The MLflow server at {tracking_uri} refused the login of {user!r} (HTTP 401): "
            "check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD."
        )
    if status == 403:
        action = next((a for key, a in _ACTIONS if key in endpoint), "do this")
        return (
            f"User {user!r} may not {action} on the MLflow server at {tracking_uri} "
            "(HTTP 403 permission denied): ask its admin for EDIT permission on the experiment "
            "or registered model, or use an account that has it."
        )
    if status >= 500:
        return (
            f"The MLflow server at {tracking_uri} failed (HTTP {status}"
            + (f" on {endpoint}" if endpoint else "")
            + "): its database or artifact store may be down; see the server's log."
        )
    return None


def is_outage(error: BaseException) -> bool:
    """Whether error means the server is away (no reply, a timeout, or a 5xx), as opposed to
    a refusal of what was sent or of who sent it: waiting and retrying can mend an outage."""
    import requests

    found = status_of(error)
    if found is not None:
        return found[0] >= 500
    if _broken_off(error) is not None:
        return True
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, requests.ConnectionError | requests.Timeout | TimeoutError):
            return True
        current = current.__cause__ or current.__context__
    return False


def is_login_refused(error: BaseException) -> bool:
    """A 401 or 403: not an outage; retrying will not help."""
    found = status_of(error)
    return found is not None and found[0] in (401, 403)
