"""Local server processes: free loopback ports, start a server in its own process group,
wait until it answers, and end it with everything it spawned.

The one home for this: the tests, the benchmarks and the developer stack all use it.
`mlflow server` starts helper processes (huey consumers) that outlive it, so a server is
always started as the leader of a new process group and the whole group is ended.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
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


def stop(proc: subprocess.Popen[Any], grace: float = 10) -> None:
    """End proc's whole process group: SIGTERM, then SIGKILL after grace seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
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
