"""Tracking and storage URIs: what kind of store a URI names, and redacting the credentials
it may carry.

MLflow's client and SQLAlchemy both take a login inside the URI (``https://user:pass@host``,
``postgresql://user:pass@host/db``), and some services take a token in the query string
(``?token=...``). Whatever a run, a study, a log line or an error sentence holds is shown
with redact(): anyone with READ on the tracking server can read a run's params, tags and
artifacts.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# What replaces a secret.
HIDDEN = "***"

# scheme://user:password@ : the password is everything up to the last "@" before the path
# (an unencoded "@" in a password still ends at the host), within one whitespace-free word,
# so a URI inside a sentence is found too.
_USERINFO = re.compile(
    r"(?P<start>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s/?#@:]*:)(?P<secret>[^\s/?#]+)(?=@)"
)

# A query parameter whose name says it holds a secret: ?token=, &password=, &X-Amz-Signature=,
# &api_key=, ... (case-insensitive).
_QUERY_SECRET = re.compile(
    r"(?P<start>[?&;][^=&#\s]*?(?:pass|pwd|token|secret|signature|sig|credential|"
    r"api[_-]?key|access[_-]?key)[^=&#\s]*=)(?P<secret>[^&#\s]+)",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """text with every URI password and query-string secret replaced by ***.

    text is a URI or a sentence holding URIs; everything else (scheme, user name, host,
    path, other query parameters) is kept, so the result still says which store it was.
    """
    text = _USERINFO.sub(lambda m: m["start"] + HIDDEN, text)
    return _QUERY_SECRET.sub(lambda m: m["start"] + HIDDEN, text)


def has_credentials(uri: str) -> bool:
    """Whether uri carries a password or a secret query parameter."""
    return redact(uri) != uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a SQLite store URI (absolute); None for other URIs and for
    in-memory databases."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    if path in ("", ":memory:"):
        return None
    return Path(path).expanduser().resolve()


def is_remote(uri: str) -> bool:
    """A tracking server (http or https)."""
    return uri.startswith(("http://", "https://"))


def is_embedded(uri: str) -> bool:
    """A SQLite file store (not an in-memory one)."""
    return sqlite_path(uri) is not None


def target_uri(uri: str) -> str:
    """uri as recorded on a spool run: an embedded store by its absolute path, so that
    `mnistflow sync` run from another folder sends the run to the same store."""
    path = sqlite_path(uri)
    return f"sqlite:///{path}" if path is not None else uri


# The local spool (mnistflow.spool) is itself an embedded store; its place is known here so
# that a sentence about an unwritable store can say when it is the spool (store/remote.py).
def spool_dir() -> Path:
    return Path(
        os.environ.get("MNISTFLOW_SPOOL_DIR") or Path.home() / ".cache" / "mnistflow" / "spool"
    )


def is_spool(uri: str) -> bool:
    """Whether uri is the spool store itself (compared by resolved path)."""
    path = sqlite_path(uri)
    return path is not None and path == (spool_dir() / "spool.db").resolve()
