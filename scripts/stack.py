"""Bring the team stack up by hand, as the tests do: PostgreSQL, an S3 server and an MLflow
tracking server with logins on free loopback ports, until Ctrl-C (`make stack`).

It prints the admin's password and two logins (alice may write, bob may only read), with
the lines that point mnistflow at the stack. Everything is thrown away when it stops.
"""

from __future__ import annotations

import secrets
import signal
import tempfile
from pathlib import Path

from mnistflow.stack.team import team_stack


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="mnistflow-stack-") as folder:
        print("Starting PostgreSQL, the S3 server and the MLflow server (about 30 s)...")
        with team_stack(Path(folder)) as stack:
            passwords = {"alice": secrets.token_urlsafe(12), "bob": secrets.token_urlsafe(12)}
            stack.add_user("alice", passwords["alice"])
            stack.add_user("bob", passwords["bob"])
            print(f"MLflow UI and API: {stack.tracking_uri}  (admin / {stack.admin_password})")
            print(f"S3 (moto): {stack.s3_endpoint}, bucket {stack.bucket}; server log {stack.log}")
            print("alice may write; bob may only read (the server's default permission).")
            for user, password in passwords.items():
                print(f"\n# as {user}:")
                print(f"export MLFLOW_TRACKING_URI={stack.tracking_uri}")
                print(f"export MLFLOW_TRACKING_USERNAME={user} MLFLOW_TRACKING_PASSWORD={password}")
            print("\nCtrl-C stops the stack.", flush=True)
            try:
                signal.pause()
            except KeyboardInterrupt:
                print("\nStopping.")


if __name__ == "__main__":
    main()
