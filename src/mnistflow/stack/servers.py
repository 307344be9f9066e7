"""Local server processes: free loopback ports, start a server in its own process group,
wait until it answers, and end it with everything it spawned.

The one home for this: the tests, the benchmarks and the developer stack all use it.
`mlflow server` starts helper processes (huey consumers) that outlive it, so a server is
always started as the leader of a new process group and the whole group is ended.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_up(
    url: str,
    proc: subprocess.Popen[Any] | None = None,
    timeout: float = 120,
    ready: Callable[[Any], bool] = lambda response: bool(response.ok),
) -> None:
    """Poll url until ready(response) holds; raise RuntimeError at the deadline.

    Every request error counts as "not yet": refused connections and also read timeouts,
    which a server that is still starting (or a busy machine) gives. proc: fail at once if
    this process has exited.
    """
    import requests  # a dependency of MLflow; imported here to keep this module light

    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before {url} answered")
        try:
            response = requests.get(url, timeout=min(5.0, max(0.5, deadline - time.monotonic())))
            if ready(response):
                return
            last = f"HTTP {response.status_code}"
        except requests.RequestException as e:
            last = type(e).__name__
        if time.monotonic() >= deadline:
            raise RuntimeError(f"{url} did not answer within {timeout:.0f} s (last: {last})")
        time.sleep(0.3)


def start(args: Sequence[str], **popen: Any) -> subprocess.Popen[Any]:
    """Start a process as the leader of a new process group (see stop)."""
    return subprocess.Popen(list(args), start_new_session=True, **popen)


def stop(
    proc: subprocess.Popen[Any], grace: float = 10, first: signal.Signals = signal.SIGTERM
) -> None:
    """End proc's whole process group: the first signal, then SIGKILL after grace seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, first)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace)
    # Helpers may outlive the leader for a moment; the group id still reaches them.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def running(
    args: Sequence[str], health_url: str, timeout: float = 120, **popen: Any
) -> Iterator[subprocess.Popen[Any]]:
    """A server running for the block's length, answering health_url when the block starts."""
    popen.setdefault("stdout", subprocess.DEVNULL)
    popen.setdefault("stderr", subprocess.DEVNULL)
    proc = start(args, **popen)
    try:
        wait_until_up(health_url, proc, timeout)
        yield proc
    finally:
        stop(proc)


# -- PostgreSQL ----------------------------------------------------------------------------


def postgres_bin() -> Path:
    """The folder holding PostgreSQL's server programs (initdb, postgres, pg_isready)."""
    found = shutil.which("initdb")
    if found:  # Debian links a few of them into PATH: follow the link to the full set
        return Path(found).resolve().parent
    # Debian keeps them off PATH, one folder per major version; take the newest.
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_major_version)
    if not candidates:
        raise RuntimeError("PostgreSQL server programs not found: apt-get install postgresql")
    return Path(candidates[-1]).parent


def _major_version(initdb: str) -> int:
    version = Path(initdb).parent.parent.name
    return int(version) if version.isdigit() else 0


@contextlib.contextmanager
def postgres(database: str = "mnistflow", timeout: float = 60) -> Iterator[str]:
    """A throwaway PostgreSQL server on a free loopback port; yields its SQLAlchemy URL
    (``postgresql+psycopg://postgres@127.0.0.1:PORT/DATABASE``, psycopg 3, no password).

    The cluster lives in a new temporary folder, removed afterwards. initdb refuses to run
    as root, so as root every PostgreSQL program runs as the ``postgres`` user. Durability
    settings are off: the data is thrown away, and tests want speed.
    """
    bin_dir = postgres_bin()
    as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="mnistflow-postgres-"))
    if as_owner:
        shutil.chown(folder, "postgres", "postgres")
    data = folder / "data"
    port = free_port()
    server = None
    try:
        subprocess.run(
            [*as_owner, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres",
             "--auth=trust", "-E", "UTF8", "--no-sync"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=True,
        )  # fmt: skip
        server = start(
            [*as_owner, str(bin_dir / "postgres"), "-D", str(data), "-p", str(port),
             "-k", str(folder), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
             "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        address = ["-h", "127.0.0.1", "-p", str(port), "-U", "postgres"]
        deadline = time.monotonic() + timeout
        while subprocess.run([str(bin_dir / "pg_isready"), *address, "-q"]).returncode != 0:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not start on port {port}")
            time.sleep(0.2)
        subprocess.run(
            [str(bin_dir / "createdb"), *address, database],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=True,
        )  # fmt: skip
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/{database}"
    finally:
        if server is not None:
            # SIGINT is PostgreSQL's "fast" shutdown: it does not wait for clients to leave.
            stop(server, first=signal.SIGINT)
        shutil.rmtree(folder, ignore_errors=True)
