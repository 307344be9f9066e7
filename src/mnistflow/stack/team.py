"""The team stack on this machine, without Docker: PostgreSQL, an S3 server and an MLflow
tracking server with logins, each on a free loopback port.

The same parts as deploy/docker-compose.yml, started from local programs: PostgreSQL 15
(servers.postgres), moto's S3 server in place of MinIO (what MLflow's own tests use), and
`mlflow server --app-name basic-auth` with its user store on PostgreSQL and the artifacts
proxied to the bucket. The tests' session fixture, the benchmark and `make stack` all start
it with team_stack(), so there is one way to bring it up.

Only the tracking server holds the bucket's credentials; clients get the tracking URI and a
login, nothing else.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mnistflow.stack import servers

BUCKET = "mlflow"
ADMIN = "admin"
# Any key pair works with moto; what matters is that only the tracking server has it.
S3_KEY_ID = "mnistflow-server"
S3_SECRET = "mnistflow-server-secret"


@dataclass
class TeamStack:
    """Where the parts of a running stack answer, and the admin's login."""

    tracking_uri: str
    s3_endpoint: str
    bucket: str
    database_uri: str
    admin_password: str
    server: subprocess.Popen[Any]
    s3: subprocess.Popen[Any]
    log: Path
    users: dict[str, str] = field(default_factory=dict)

    @property
    def s3_env(self) -> dict[str, str]:
        """The bucket's credentials: for the tracking server (and checks of the bucket) only."""
        return s3_credentials(self.s3_endpoint)

    def client_env(self, username: str | None) -> dict[str, str]:
        """What a client needs to use the stack as username (None: anonymous)."""
        env = {"MLFLOW_TRACKING_URI": self.tracking_uri}
        if username is not None:
            env["MLFLOW_TRACKING_USERNAME"] = username
            env["MLFLOW_TRACKING_PASSWORD"] = self.users[username]
        return env

    def s3_client(self) -> Any:
        """A boto3 client on the bucket's S3 server, with the server's credentials."""
        return s3_client(self.s3_endpoint)

    def add_user(self, username: str, password: str) -> None:
        """Create a login. It may read everything (the server's default_permission) and
        manages what it creates; the admin grants more with MLflow's auth client."""
        self._admin_post("users/create", {"username": username, "password": password})
        self.users[username] = password

    def _admin_post(self, endpoint: str, body: Mapping[str, str]) -> None:
        import requests

        response = requests.post(
            f"{self.tracking_uri}/api/2.0/mlflow/{endpoint}",
            json=body,
            auth=(ADMIN, self.admin_password),
            timeout=30,
        )
        if not response.ok:
            raise RuntimeError(f"{endpoint} answered {response.status_code}: {response.text}")


def s3_credentials(endpoint: str) -> dict[str, str]:
    """The environment that gives boto3 (in MLflow's server) the S3 server and its keys."""
    return {
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": S3_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def s3_client(endpoint: str) -> Any:
    """A boto3 client on the S3 server at endpoint, with the tracking server's keys."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=S3_KEY_ID,
        aws_secret_access_key=S3_SECRET,
        region_name="us-east-1",
    )


def tool_env(**extra: str) -> dict[str, str]:
    """This environment with the venv's bin folder first on PATH: `mlflow server` starts
    `uvicorn` by name, as it finds it when the venv is activated."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


def client_free_env(env: Mapping[str, str]) -> dict[str, str]:
    """env without anything that would let a process reach the bucket by itself."""
    banned = ("AWS_", "MLFLOW_S3_", "MLFLOW_TRACKING_", "MLFLOW_REGISTRY_")
    return {k: v for k, v in env.items() if not k.startswith(banned)}


@contextlib.contextmanager
def s3_server(timeout: float = 60) -> Iterator[tuple[str, subprocess.Popen[Any]]]:
    """moto's S3 server on a free loopback port; yields (endpoint URL, its process)."""
    port = servers.free_port()
    endpoint = f"http://127.0.0.1:{port}"
    args = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with servers.running(args, f"{endpoint}/moto-api/", timeout, env=tool_env()) as proc:
        yield endpoint, proc


def auth_config(folder: Path, database_uri: str, admin_password: str) -> Path:
    """basic_auth.ini for the server: users in database_uri, READ for every logged-in user
    unless granted more (writers own what they create)."""
    ini = folder / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {database_uri}\n"
        f"admin_username = {ADMIN}\n"
        f"admin_password = {admin_password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # Without the cache every request pays a PBKDF2 password check (seconds each on a
        # busy machine); a password change reaches other workers within this many seconds.
        "auth_cache_ttl_seconds = 60\n"
    )
    ini.chmod(0o600)
    return ini


def tracking_server_args(
    database_uri: str, artifacts_destination: str, port: int, workers: int = 1
) -> list[str]:
    """The `mlflow server` command line of the stack (the compose file uses the same flags)."""
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", database_uri,
        "--artifacts-destination", artifacts_destination,
        "--serve-artifacts",
        "--app-name", "basic-auth",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--allowed-hosts", f"127.0.0.1:{port},localhost:{port}",
        "--workers", str(workers),
    ]  # fmt: skip


@contextlib.contextmanager
def tracking_server(
    folder: Path,
    database_uri: str,
    auth_database_uri: str,
    artifacts_destination: str,
    s3_env: Mapping[str, str],
    admin_password: str,
    workers: int = 1,
    timeout: float = 180,
) -> Iterator[tuple[str, subprocess.Popen[Any], Path]]:
    """`mlflow server` with logins over PostgreSQL and S3; yields (URL, process, log file)."""
    port = servers.free_port()
    url = f"http://127.0.0.1:{port}"
    env = tool_env(
        **s3_env,
        MLFLOW_AUTH_CONFIG_PATH=str(auth_config(folder, auth_database_uri, admin_password)),
        # The CSRF key of the user-creation page; one value for every worker.
        MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16),
    )
    log = folder / f"mlflow-server-{port}.log"
    args = tracking_server_args(database_uri, artifacts_destination, port, workers)
    with (
        log.open("wb") as sink,
        servers.running(
            args, f"{url}/health", timeout, env=env, stdout=sink, stderr=subprocess.STDOUT
        ) as proc,
    ):
        yield url, proc, log


def create_database(server_uri: str, name: str) -> str:
    """A new database beside server_uri's on the same PostgreSQL server; returns its URI."""
    import psycopg

    plain = server_uri.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return server_uri.rsplit("/", 1)[0] + f"/{name}"


@contextlib.contextmanager
def team_stack(folder: Path, workers: int = 1) -> Iterator[TeamStack]:
    """The whole stack for the block's length: PostgreSQL, S3 with the bucket, MLflow with
    logins. Server logs and the auth config are written to folder."""
    folder.mkdir(parents=True, exist_ok=True)
    admin_password = secrets.token_urlsafe(16)
    with servers.postgres("mlflow") as database_uri, s3_server() as (endpoint, s3):
        auth_uri = create_database(database_uri, "mlflow_auth")
        s3_client(endpoint).create_bucket(Bucket=BUCKET)
        with tracking_server(
            folder,
            database_uri,
            auth_uri,
            f"s3://{BUCKET}/artifacts",
            s3_credentials(endpoint),
            admin_password,
            workers,
        ) as (url, server, log):
            yield TeamStack(url, endpoint, BUCKET, database_uri, admin_password, server, s3, log)
