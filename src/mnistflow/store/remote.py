"""What a tracking store's refusals mean, in one sentence each.

A server with logins answers 401 (no or wrong login) and 403 (the login may not do this);
a server whose database or bucket is down answers 5xx. MLflow's client turns each into an
MlflowException whose text ends in the server's reply. An embedded store (a SQLite file and
an artifact folder) that cannot be written now (disk full, read-only, no permission) raises
SQLite's or the OS's error, which MLflow and SQLAlchemy wrap. Every mnistflow command passes
such errors through sentence() so the user reads what happened and what to fix, not a
traceback; is_outage() says which of them waiting can mend.
"""

from __future__ import annotations

import errno
import os
import re
import sqlite3

import requests  # a dependency of MLflow
from mlflow.exceptions import MlflowException, RestException

from mnistflow.store.uris import is_spool, redact

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
    """One sentence for a 401, 403 or 5xx from the tracking server, for a request it broke
    off, or for an embedded store that cannot be written; None for anything else.

    URIs are shown without their passwords, in this sentence and the ones below."""
    tracking_uri = redact(tracking_uri)
    found = status_of(error)
    if found is not None:
        return describe(found[0], found[1], tracking_uri)
    url = _broken_off(error)
    if url is None:
        return store_sentence(error, tracking_uri)
    url = redact(url)
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
    tracking_uri = redact(tracking_uri)
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
    """Whether error means the store is away (a server's no reply, timeout or 5xx; an embedded
    store that cannot be written now), as opposed to a refusal of what was sent or of who
    sent it: waiting and retrying (or freeing space) can mend an outage."""
    found = status_of(error)
    if found is not None:
        return found[0] >= 500
    if _broken_off(error) is not None or unwritable(error) is not None:
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


# Why an embedded store cannot be written now, by SQLite's primary result code (sqlite3's
# errors carry it) and by the OS's errno (artifact files, the store's folder).
_SQLITE_UNWRITABLE = {
    sqlite3.SQLITE_FULL: "its disk is full",
    sqlite3.SQLITE_READONLY: "it is read-only",
    sqlite3.SQLITE_CANTOPEN: "its database file cannot be opened for writing",
}
# SQLite's own words for the same, for an error that reached us as text only.
_SQLITE_WORDS = {
    "database or disk is full": sqlite3.SQLITE_FULL,
    "attempt to write a readonly database": sqlite3.SQLITE_READONLY,
    "unable to open database file": sqlite3.SQLITE_CANTOPEN,
}
_ERRNO_UNWRITABLE = {
    errno.ENOSPC: "its disk is full",
    errno.EDQUOT: "its disk quota is used up",
    errno.EROFS: "it is read-only",
    errno.EACCES: "permission denied",
}


def unwritable(error: BaseException) -> str | None:
    """Why an embedded store cannot be written now ("its disk is full", "it is read-only",
    ...), found along error's chain of causes; None when error is something else."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, sqlite3.Error):
            code = getattr(current, "sqlite_errorcode", None)
            if code is not None and code & 0xFF in _SQLITE_UNWRITABLE:  # extended -> primary
                return _SQLITE_UNWRITABLE[code & 0xFF]
        if isinstance(current, OSError) and current.errno in _ERRNO_UNWRITABLE:
            where = f" ({current.filename})" if current.filename else ""
            return _ERRNO_UNWRITABLE[current.errno] + where
        text = str(current)
        for words, code in _SQLITE_WORDS.items():
            if words in text:
                return _SQLITE_UNWRITABLE[code]
        current = current.__cause__ or current.__context__
    return None


def store_sentence(error: BaseException, tracking_uri: str) -> str | None:
    """One sentence for an embedded store that cannot be written; None for anything else."""
    why = unwritable(error)
    if why is None:
        return None
    tracking_uri = redact(tracking_uri)
    if is_spool(tracking_uri):
        return (
            f"The local spool {tracking_uri} cannot be written now: {why}; set "
            "MNISTFLOW_SPOOL_DIR to a folder on another disk."
        )
    return f"The MLflow store {tracking_uri} cannot be written now: {why}."


def send_later(tracking_uri: str) -> str:
    """When a run kept in the local spool can be sent to tracking_uri, as the end of a
    sentence (the warnings and the train command's last word use it)."""
    if tracking_uri.startswith("sqlite:"):
        return "once the store can be written again (space freed, permissions mended)"
    return "once the server is back"
