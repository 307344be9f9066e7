"""The team stack against the embedded store: the fast preset's `mnistflow train`, once
against sqlite in a temporary folder and once against PostgreSQL + S3 + an MLflow server
with logins (mnistflow.stack.team, the tests' stack), interleaved, medians compared.

Three times per run: training (the training loops only, as the command reports it), the
whole command (invoked in-process through its Typer entry point, so interpreter start and
imports, the same for both, are left out), and logging the models and artifacts (the
ONNX + pytorch models, the reports, the weights and the config: the calls that upload).

Usage: python benchmarks/bench_stack.py [--repeats 5] [--limit-train N]
Prints a Markdown table (the README's) and writes benchmarks/results/stack.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
from typer.testing import CliRunner

from common import RESULTS, table
from mnistflow import tracking
from mnistflow.cli.app import app
from mnistflow.lifecycle import registry
from mnistflow.stack.team import client_free_env, team_stack


class UploadClock:
    """Adds up the time spent in the calls that log models and artifacts."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, owner: Any, name: str) -> Callable[[], None]:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        setattr(owner, name, timed)
        return lambda: setattr(owner, name, original)


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]


def train_once(env: dict[str, str], folder: Path, limit_train: int | None) -> dict[str, float]:
    clock = UploadClock()
    restore = [
        clock.wrap(registry, "log_models"),
        clock.wrap(tracking.TrackedRun, "log_file"),
        clock.wrap(tracking.TrackedRun, "log_folder"),
    ]
    args = ["train", "--json", "--no-system-metrics"]
    if limit_train:
        args += ["--limit-train", str(limit_train)]
    cwd = Path.cwd()
    try:
        with environment(env):
            os.chdir(folder)
            started = time.perf_counter()
            result = CliRunner().invoke(app, args, catch_exceptions=False)
            whole = time.perf_counter() - started
    finally:
        os.chdir(cwd)
        for undo in restore:
            undo()
    if result.exit_code != 0:
        raise RuntimeError(f"train failed: {result.stderr}")
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    return {"train": summary["train_seconds"], "whole": whole, "log": clock.seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--limit-train", type=int, default=None)
    options = parser.parse_args()

    base = client_free_env(dict(os.environ))
    times: dict[str, list[dict[str, float]]] = {"embedded": [], "stack": []}
    with tempfile.TemporaryDirectory(prefix="bench-stack-") as tmp:
        root = Path(tmp)
        embedded = root / "embedded"
        embedded.mkdir()
        print("starting the stack (PostgreSQL, S3, MLflow with logins)...", flush=True)
        with team_stack(root / "stack") as stack:
            stack.add_user("bench", "bench-password-1")
            client = root / "client"
            client.mkdir()
            envs = {
                "embedded": {
                    **base,
                    "MLFLOW_TRACKING_URI": f"sqlite:///{embedded / 'mlflow.db'}",
                },
                "stack": {**base, **stack.client_env("bench")},
            }
            folders = {"embedded": embedded, "stack": client}
            # One small untimed run each: imports, the data cache, the server's first requests.
            for name in times:
                train_once(envs[name], folders[name], 1000)
            for i in range(options.repeats):
                # Alternate which goes first, so a slow spell of the machine hits both.
                order = ["embedded", "stack"] if i % 2 == 0 else ["stack", "embedded"]
                for name in order:
                    measured = train_once(envs[name], folders[name], options.limit_train)
                    times[name].append(measured)
                    print(name, {k: round(v, 2) for k, v in measured.items()}, flush=True)

    def median(name: str, key: str) -> float:
        return statistics.median(t[key] for t in times[name])

    rows = []
    for key, label in (
        ("train", "training"),
        ("whole", "whole command (in-process)"),
        ("log", "logging models + artifacts"),
    ):
        local, remote = median("embedded", key), median("stack", key)
        spread = [t[key] for t in times["stack"]]
        rows.append(
            [
                label,
                f"{local:.2f} s",
                f"{remote:.2f} s ({min(spread):.2f}-{max(spread):.2f})",
                f"{remote / local:.2f}x",
            ]
        )
    print(table(["time (median)", "embedded sqlite", "team stack, min-max", "ratio"], rows))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "stack.json").write_text(
        json.dumps({"options": vars(options), "times": times}, indent=2)
    )


if __name__ == "__main__":
    main()
