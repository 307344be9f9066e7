"""Make sure the digit service's read-only account logs in (run on every `up`; idempotent).

The server's default_permission is READ, so the account may read every experiment and model
and change nothing. When it already logs in with MNISTFLOW_SERVE_PASSWORD there is nothing
to do and the admin's password is not used: the admin may change theirs in the UI without
breaking the next `up`. Only to create the account, or to give it a changed
MNISTFLOW_SERVE_PASSWORD, does this log in as the admin (MLFLOW_ADMIN_PASSWORD).

Usage: python create_user.py http://mlflow:5000
"""

import base64
import json
import os
import sys
import urllib.error
import urllib.request

API = "/api/2.0/mlflow"


def call(base: str, method: str, path: str, login: tuple[str, str], body: dict | None = None) -> tuple[int, str]:
    """(HTTP status, reply text) of one request to the tracking server."""
    token = base64.b64encode(":".join(login).encode()).decode()
    request = urllib.request.Request(
        base + API + path,
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Content-Type": "application/json", "Authorization": f"Basic {token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, reply.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def ensure_user(base: str, username: str, password: str, admin_password: str) -> str:
    """What was done, in one sentence; raises SystemExit with one sentence when it cannot."""
    # Any request the account may make: its login is checked before anything else.
    status, _ = call(base, "GET", "/experiments/search?max_results=1", (username, password))
    if status == 200:
        return f"the read-only user {username!r} logs in already; nothing to do"
    if status != 401:
        raise SystemExit(f"The tracking server answered HTTP {status} to {username!r}'s login check; see its log.")
    admin = ("admin", admin_password)
    status, reply = call(base, "POST", "/users/create", admin, {"username": username, "password": password})
    if status == 200:
        return f"created the read-only user {username!r}"
    if "RESOURCE_ALREADY_EXISTS" in reply:
        # It exists with another password: MNISTFLOW_SERVE_PASSWORD was changed in deploy/.env.
        status, reply = call(base, "PATCH", "/users/update-password", admin, {"username": username, "password": password})
        if status == 200:
            return f"set the password of the user {username!r} to MNISTFLOW_SERVE_PASSWORD"
    if status == 401:
        raise SystemExit(
            f"The user {username!r} does not log in with MNISTFLOW_SERVE_PASSWORD and the admin's login "
            "was refused (HTTP 401): put the admin's current password (changed in the UI?) in "
            "MLFLOW_ADMIN_PASSWORD in deploy/.env and run `docker compose up -d` again."
        )
    raise SystemExit(f"The tracking server refused to set up the user {username!r} (HTTP {status}): {reply[:300]}")


if __name__ == "__main__":
    done = ensure_user(
        sys.argv[1].rstrip("/"),
        os.environ["MNISTFLOW_SERVE_USERNAME"],
        os.environ["MNISTFLOW_SERVE_PASSWORD"],
        os.environ["MLFLOW_ADMIN_PASSWORD"],
    )
    print(done)
