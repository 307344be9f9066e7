"""The `mnistflow` command: parses arguments, calls the library, prints results.

Expected failures (bad input, unreachable store, missing data) end with one sentence on
stderr and a non-zero exit code; Ctrl-C ends a run as KILLED and exits 130.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from mnistflow.config import PRESETS, DataConfig, MnistflowError, TrackingConfig, preset_config
from mnistflow.registry import MODEL_NAME
from mnistflow.train import Reporter

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Progress and messages go to stderr, so stdout carries only results (and --json's line).
err = Console(stderr=True)
out = Console(highlight=False)

Preset = Enum("Preset", {name: name for name in PRESETS}, type=str)  # type: ignore[misc]


class DeviceChoice(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


F = TypeVar("F", bound=Callable[..., Any])


def friendly_errors(command: F) -> F:
    """Turn expected failures into one line on stderr and an exit code, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except MnistflowError as e:
            err.print(f"[bold red]Error:[/] {e}", soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print(
                "[yellow]Interrupted:[/] the run was ended as KILLED; everything logged so far "
                "is kept."
            )
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


class ProgressBar(Reporter):
    """A rich progress bar over training steps, with the latest loss and epoch results."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} steps"),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self.task: Any = None

    def start(self, total_steps: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task("train", total=total_steps, loss="-")

    def log_steps(
        self, first_step: int, series: Mapping[str, Sequence[float]], timestamps_ms: Sequence[int]
    ) -> None:
        losses = series["train_loss"]
        self.progress.update(self.task, advance=len(losses), loss=f"{losses[-1]:.4f}")

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        self.progress.console.print(
            f"epoch {epoch}: train loss {metrics['train_loss']:.4f}, "
            f"val loss {metrics['val_loss']:.4f}, val accuracy {metrics['val_accuracy']:.2%}, "
            f"{metrics['epoch_seconds']:.1f} s ({metrics['images_per_second']:,.0f} images/s)"
        )
        if self.task is not None and self.progress.tasks[0].finished:
            self.progress.stop()

    def stop(self) -> None:
        self.progress.stop()


def parse_tags(values: list[str] | None) -> dict[str, str]:
    tags = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{item!r} is not KEY=VALUE.", param_hint="--tag")
        tags[key.strip()] = value
    return tags


def print_result(result: Mapping[str, Any], as_json: bool, title: str) -> None:
    """A small table for people, or one JSON object as the last line of stdout."""
    if as_json:
        out.print(json.dumps(result, default=str), soft_wrap=True)
        return
    table = Table(title=title, show_header=False, title_justify="left")
    for key, value in result.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        table.add_row(key, shown)
    out.print(table)


@app.callback()
def main() -> None:
    """An MNIST classifier whose whole life runs on MLflow: train, track, register, serve."""
    # MLflow's INFO lines would drown the progress bar; its warnings still show.
    logging.getLogger("mlflow").setLevel(logging.WARNING)


# -- shared options ----------------------------------------------------------------------

TrackingUri = Annotated[
    str | None,
    typer.Option(
        help="MLflow tracking URI [default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db "
        "in the working directory].",
        show_default=False,
    ),
]
ModelName = Annotated[str, typer.Option(help="Registered model name.")]
JsonOut = Annotated[
    bool, typer.Option("--json", help="Print the result as one JSON object on the last line.")
]


@app.command()
@friendly_errors
def train(
    preset: Annotated[Preset, typer.Option(help="Training recipe.")] = Preset["fast"],  # type: ignore[misc]
    epochs: Annotated[
        int | None, typer.Option(min=1, help="Epochs [default: the preset's].", show_default=False)
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(min=1, help="Images per step [default: the preset's].", show_default=False),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(help="Peak learning rate [default: the preset's].", show_default=False),
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Random seed; the same seed on CPU gives the same run.")
    ] = 0,
    device: Annotated[DeviceChoice, typer.Option(help="Where to train.")] = DeviceChoice.auto,
    limit_train: Annotated[
        int | None,
        typer.Option(min=1, help="Train on only the first N training images (fast mode)."),
    ] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment name.")] = "mnist",
    run_name: Annotated[
        str | None, typer.Option(help="Run name [default: MLflow picks one].", show_default=False)
    ] = None,
    description: Annotated[
        str | None, typer.Option(help="Run description shown in the MLflow UI.")
    ] = None,
    tag: Annotated[
        list[str] | None, typer.Option(help="Run tag KEY=VALUE; repeatable.", show_default=False)
    ] = None,
    tracking_uri: TrackingUri = None,
    async_logging: Annotated[
        bool,
        typer.Option(
            "--async-logging/--sync-logging",
            help="Log metrics through MLflow's background queue (flushed before the run ends).",
        ),
    ] = True,
    system_metrics: Annotated[
        bool, typer.Option(help="Record CPU, memory and GPU use with MLflow's system metrics.")
    ] = True,
    register: Annotated[
        bool, typer.Option(help="Register the logged model; the new version gets @challenger.")
    ] = False,
    model_name: ModelName = MODEL_NAME,
    as_json: JsonOut = False,
) -> None:
    """Train a model on MNIST and record the run (and its model) in MLflow."""
    from mnistflow.pipeline import train_run

    train_config = preset_config(
        preset.value, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device.value
    )
    tracking_config = TrackingConfig(
        tracking_uri=tracking_uri,
        experiment=experiment,
        run_name=run_name,
        description=description,
        tags=parse_tags(tag),
        async_logging=async_logging,
        system_metrics=system_metrics,
    )
    bar = ProgressBar(err)
    try:
        summary = train_run(
            DataConfig(limit_train=limit_train),
            train_config,
            tracking_config,
            bar,
            register_as=model_name if register else None,
        )
    finally:
        bar.stop()
    print_result(summary.as_dict(), as_json, "Training run")
    if not as_json:
        err.print(f"See it in the MLflow UI: [bold]mnistflow ui[/] (run {summary.run_id}).")


@app.command()
@friendly_errors
def ui(
    tracking_uri: TrackingUri = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 5000,
) -> None:
    """Open the MLflow UI on the same store the runs went to."""
    from mnistflow.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith(("http://", "https://")):
        err.print(f"The tracking server serves its own UI: open {uri}")
        return
    err.print(f"MLflow UI for {uri} at http://{host}:{port} (Ctrl-C stops it)")
    args = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
    args += ["--host", host, "--port", str(port)]
    if uri.startswith("sqlite:///"):
        # Runs logged without a server keep artifacts in ./mlruns beside the database.
        store = Path(uri.removeprefix("sqlite:///")).resolve().parent
        args += ["--default-artifact-root", str(store / "mlruns")]
    os.execv(sys.executable, args)


@app.command()
@friendly_errors
def register(
    run_id: Annotated[str, typer.Argument(help="The training run whose model to register.")],
    model_name: ModelName = MODEL_NAME,
    tracking_uri: TrackingUri = None,
    as_json: JsonOut = False,
) -> None:
    """Register a finished run's model as a new version (it gets @challenger)."""
    from mnistflow import registry
    from mnistflow.tracking import resolve_tracking_uri

    resolve_tracking_uri(tracking_uri)
    mv = registry.register(run_id, model_name)
    result = {"model_name": model_name, "version": str(mv.version), "run_id": run_id}
    print_result({**result, "description": mv.description}, as_json, "Registered")


@app.command()
@friendly_errors
def rollback(
    model_name: ModelName = MODEL_NAME,
    tracking_uri: TrackingUri = None,
    as_json: JsonOut = False,
) -> None:
    """Move @champion back to the previous champion."""
    from mlflow.tracking import MlflowClient

    from mnistflow import registry
    from mnistflow.tracking import resolve_tracking_uri

    resolve_tracking_uri(tracking_uri)
    was, now = registry.rollback(MlflowClient(), model_name)
    result = {"model_name": model_name, "rolled_back_from": was, "champion_version": now}
    print_result(result, as_json, "Rollback")
