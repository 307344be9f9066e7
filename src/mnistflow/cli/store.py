"""Commands that look at a tracking store: ui (the MLflow UI on it) and doctor (its checks)."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from mnistflow.cli.options import TrackingUri
from mnistflow.cli.output import err, out
from mnistflow.store.uris import redact


def ui(
    tracking_uri: TrackingUri = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 5000,
) -> None:
    """Open the MLflow UI on the same store the runs went to."""
    # Imported here: keeps torch and MLflow out of `mnistflow --help`'s start-up.
    from mnistflow.store.checks import resolve_tracking_uri, use_store
    from mnistflow.store.uris import sqlite_path

    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith(("http://", "https://")):
        err.print(f"The tracking server serves its own UI: open {redact(uri)}")
        return
    use_store(uri)  # an existing store: the UI would create an empty one
    err.print(f"MLflow UI for {redact(uri)} at http://{host}:{port} (Ctrl-C stops it)")
    args = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
    # One worker: a personal UI has one reader, and each of MLflow's default four imports the
    # whole server (seconds of CPU apiece before the page answers on a 2-core machine).
    args += ["--host", host, "--port", str(port), "--workers", "1"]
    database = sqlite_path(uri)
    if database is not None:
        # Runs logged without a server keep artifacts in ./mlruns beside the database.
        args += ["--default-artifact-root", str(database.parent / "mlruns")]
    os.execv(sys.executable, args)


def doctor(
    tracking_uri: TrackingUri = None,
    experiment: Annotated[
        str, typer.Option(help="Experiment to test writing to (a scratch run, then deleted).")
    ] = "mnist",
) -> None:
    """Check the tracking setup: server and version, login for reading and writing, artifacts."""
    # Imported here: keeps torch and MLflow out of `mnistflow --help`'s start-up.
    from mnistflow.stack.doctor import run_checks
    from mnistflow.store.checks import resolve_tracking_uri

    checks = run_checks(resolve_tracking_uri(tracking_uri), experiment)
    for check in checks:
        mark = "[green]ok  [/]" if check.ok else "[bold red]FAIL[/]"
        out.print(f"{mark} {check.name:<9} {redact(check.text)}", soft_wrap=True)
    if not all(check.ok for check in checks):
        raise typer.Exit(1)
