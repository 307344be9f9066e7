"""Tracking and storage URIs: redacting the credentials they may carry.

MLflow's client and SQLAlchemy both take a login inside the URI (``https://user:pass@host``,
``postgresql://user:pass@host/db``), and some services take a token in the query string
(``?token=...``). Whatever a run, a study, a log line or an error sentence holds is shown
with redact(): anyone with READ on the tracking server can read a run's params, tags and
artifacts.
"""

from __future__ import annotations

import re

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
