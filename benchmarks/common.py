"""What the benchmarks share: result folder, Markdown tables, servers on loopback that are
always ended with their whole process group."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from mnistflow.stack import servers
from mnistflow.stack.servers import free_port

RESULTS = Path(__file__).resolve().parent / "results"
BIN = Path(sys.executable).parent
T = TypeVar("T")


def rotated(items: Sequence[T], round_: int) -> list[T]:
    """items starting at position round_ (wrapping): interleaved rounds that rotate the order,
    so that no configuration always runs in the same place of a round."""
    start = round_ % len(items)
    return [*items[start:], *items[:start]]


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table, as pasted into the README."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def tool_env(**extra: str) -> dict[str, str]:
    """MLflow's commands start uvicorn and others by name: this venv's bin goes on PATH."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


@contextlib.contextmanager
def background(args: Sequence[str], health_url: str, **env: str) -> Iterator[None]:
    """Run a server in its own process group until the block ends; the group is killed, so
    helpers it spawned (mlflow's huey consumers, uvicorn workers) go with it."""
    with servers.running(args, health_url, env=tool_env(**env)):
        yield


@contextlib.contextmanager
def mlflow_server(folder: Path) -> Iterator[str]:
    """A local `mlflow server` (sqlite backend, local artifacts) on a free loopback port."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    args = [
        str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
        "--artifacts-destination", str(folder / "artifacts"), "--workers", "1",
    ]  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    with background(args, f"{uri}/health"):
        yield uri
