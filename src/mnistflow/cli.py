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
from enum import Enum, StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from mnistflow.config import (
    MODEL_NAME,
    PRESETS,
    DataConfig,
    MnistflowError,
    TrackingConfig,
    preset_config,
)
from mnistflow.reporting import Reporter

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Progress and messages go to stderr, so stdout carries only results (and --json's line).
err = Console(stderr=True)
out = Console(highlight=False)

Preset = Enum("Preset", {name: name for name in PRESETS}, type=str)  # type: ignore[misc]


class Engine(StrEnum):
    plain = "plain"
    lightning = "lightning"


class DeviceChoice(StrEnum):
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
    # Lightning's INFO lines (devices found, tips, "max_epochs reached") likewise.
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)


# -- shared options ----------------------------------------------------------------------

TrackingUri = Annotated[
    str | None,
    typer.Option(
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db "
        "in the working directory).",
        show_default=False,
    ),
]
ModelName = Annotated[str, typer.Option(help="Registered model name.")]
PresetOption = Annotated[Preset, typer.Option(help="Training recipe.")]  # type: ignore[valid-type]
Epochs = Annotated[
    int | None, typer.Option(min=1, help="Epochs (default: the preset's).", show_default=False)
]
Seed = Annotated[int, typer.Option(help="Random seed; the same seed on CPU gives the same run.")]
DeviceOption = Annotated[DeviceChoice, typer.Option(help="Where to train.")]
LimitTrain = Annotated[
    int | None,
    typer.Option(min=1, help="Train on only the first N training images (fast mode)."),
]
JsonOut = Annotated[
    bool, typer.Option("--json", help="Print the result as one JSON object on the last line.")
]


@app.command()
@friendly_errors
def train(
    preset: PresetOption = Preset["fast"],
    epochs: Epochs = None,
    batch_size: Annotated[
        int | None,
        typer.Option(min=1, help="Images per step (default: the preset's).", show_default=False),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(help="Peak learning rate (default: the preset's).", show_default=False),
    ] = None,
    seed: Seed = 0,
    device: DeviceOption = DeviceChoice.auto,
    limit_train: LimitTrain = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment name.")] = "mnist",
    run_name: Annotated[
        str | None, typer.Option(help="Run name (default: MLflow picks one).", show_default=False)
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
    engine: Annotated[
        Engine,
        typer.Option(
            help="plain: our own loop, tracked by hand; lightning: PyTorch Lightning "
            "under MLflow's autolog."
        ),
    ] = Engine.plain,
    devices: Annotated[
        int, typer.Option(min=1, help="Processes (CPU) or GPUs per machine; >1 trains with DDP.")
    ] = 1,
    num_nodes: Annotated[int, typer.Option(min=1, help="Machines in the DDP job.")] = 1,
    resume: Annotated[
        str | None,
        typer.Option(
            help="Continue this interrupted Lightning run (its config, its last checkpoint, the "
            "same MLflow run).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Train a model on MNIST and record the run (and its model) in MLflow."""
    from mnistflow.pipeline import train_run

    if engine is Engine.plain and (devices > 1 or num_nodes > 1 or resume):
        flag = "--resume" if resume else "--devices" if devices > 1 else "--num-nodes"
        raise typer.BadParameter(
            "needs --engine lightning: the plain loop runs on one process and keeps no "
            "checkpoints.",
            param_hint=flag,
        )

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
        if engine is Engine.lightning:
            from mnistflow import lightning_run

            lightning_summary = lightning_run.train_run(
                DataConfig(limit_train=limit_train),
                train_config,
                tracking_config,
                devices,
                num_nodes,
                resume,
                bar,
                register_as=model_name if register else None,
            )
            if lightning_summary is None:
                return  # another DDP process: rank 0 reports
            summary = lightning_summary
        else:
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


@app.command()
@friendly_errors
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    model_uri: Annotated[
        str, typer.Option(help="Model to serve; an alias URI is followed as it moves.")
    ] = f"models:/{MODEL_NAME}@champion",
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="MNISTFLOW_API_KEY",
            help="Require this key (X-API-Key header) on the predict endpoints.",
            show_default=False,
        ),
    ] = None,
    poll_seconds: Annotated[
        float, typer.Option(min=0.1, help="How often to check where the alias points.")
    ] = 5.0,
    max_body_bytes: Annotated[
        int, typer.Option(min=1, help="Larger request bodies get 413.")
    ] = 1_000_000,
    max_images: Annotated[
        int, typer.Option(min=1, help="Most digits or images in one request.")
    ] = 128,
    access_log: Annotated[bool, typer.Option(help="Log every request (costs ~10%).")] = False,
    tracking_uri: TrackingUri = None,
) -> None:
    """Serve the model over HTTP: predict endpoints, health, metrics, a draw-a-digit page."""
    from mnistflow.serving import ServeConfig, run

    run(
        ServeConfig(
            host=host,
            port=port,
            model_uri=model_uri,
            api_key=api_key,
            poll_seconds=poll_seconds,
            tracking_uri=tracking_uri,
            max_body_bytes=max_body_bytes,
            max_images=max_images,
            access_log=access_log,
        )
    )


MinAccuracy = Annotated[
    float, typer.Option(min=0, max=1, help="Absolute floor on the challenger's test accuracy.")
]
Margin = Annotated[
    float,
    typer.Option(min=0, max=1, help="How much worse than the champion the challenger may be."),
]


def print_decision(decision: Mapping[str, Any]) -> None:
    table = Table(title=f"Promotion of {decision['model_name']}", title_justify="left")
    table.add_column("version")
    table.add_column("role")
    table.add_column("accuracy", justify="right")
    table.add_column("f1 (weighted)", justify="right")
    for evidence in decision["evidence"]:
        m = evidence["metrics"]
        table.add_row(
            evidence["version"],
            evidence["role"],
            f"{m['accuracy_score']:.4f}",
            f"{m['f1_score']:.4f}",
        )
    out.print(table)
    verdict = "[bold green]promoted[/]" if decision["promoted"] else "[bold yellow]not promoted[/]"
    out.print(f"{verdict}: {decision['reason']}")
    out.print(f"@champion is version {decision['champion_version'] or 'unset'}.")


@app.command()
@friendly_errors
def promote(
    model_name: ModelName = MODEL_NAME,
    version: Annotated[
        str | None,
        typer.Option(
            help="Version to consider (default: the one @challenger points at).", show_default=False
        ),
    ] = None,
    min_accuracy: MinAccuracy = 0.99,
    margin: Margin = 0.002,
    tracking_uri: TrackingUri = None,
    as_json: JsonOut = False,
) -> None:
    """Evaluate @challenger against @champion on the test set; move @champion if it passes."""
    from mnistflow.promotion import promote as run_promotion
    from mnistflow.tracking import resolve_tracking_uri

    resolve_tracking_uri(tracking_uri)
    decision = run_promotion(model_name, version, min_accuracy, margin).as_dict()
    if as_json:
        print_result(decision, True, "")
    else:
        print_decision(decision)


@app.command()
@friendly_errors
def predict(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            help="PNG/JPEG files, folders of them, .npy arrays (N, 28, 28) or MNIST IDX files.",
            show_default=False,
        ),
    ],
    model_uri: Annotated[
        str, typer.Option(help="Model to use.")
    ] = f"models:/{MODEL_NAME}@champion",
    output: Annotated[
        Path | None,
        typer.Option(
            help="Write results here (.csv or .json) (default: CSV on stdout).", show_default=False
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Digits per model call.")] = 1024,
    tracking_uri: TrackingUri = None,
) -> None:
    """Classify digits with a logged model (the champion by default).

    Exit code 0: all inputs classified; 3: some inputs could not be read (listed on stderr),
    the rest were classified.
    """
    from mnistflow import inference
    from mnistflow.tracking import resolve_tracking_uri

    resolve_tracking_uri(tracking_uri)
    digits = inference.collect(inputs)
    for source, reason in digits.failures:
        err.print(f"[yellow]skipped[/] {source}: {reason}", soft_wrap=True)
    if not len(digits):
        raise MnistflowError("None of the inputs could be read as a digit.")
    classifier, _ = inference.load_classifier(model_uri)
    with Progress(
        TextColumn("[bold]predict"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task("predict", total=len(digits))
        labels, probabilities = inference.classify(
            classifier, digits.all_pixels(), batch_size, lambda n: bar.advance(task, n)
        )
    inference.write(inference.rows(digits, labels, probabilities), output)
    known = digits.all_labels()
    summary = f"{len(digits)} digits classified with {model_uri}"
    if known is not None:
        summary += f"; accuracy {float((labels == known).mean()):.2%} against the known labels"
    err.print(summary + (f"; written to {output}" if output else "") + ".")
    if digits.failures:
        err.print(f"[yellow]{len(digits.failures)} input(s) could not be read.[/]")
        raise typer.Exit(3)


@app.command()
@friendly_errors
def pipeline(
    preset: PresetOption = Preset["fast"],
    epochs: Epochs = None,
    seed: Seed = 0,
    device: DeviceOption = DeviceChoice.auto,
    limit_train: LimitTrain = None,
    model_name: ModelName = MODEL_NAME,
    min_accuracy: MinAccuracy = 0.99,
    margin: Margin = 0.002,
    samples: Annotated[
        Path, typer.Option(help="Folder for the sample test digits written as PNGs.")
    ] = Path("sample-digits"),
    tracking_uri: TrackingUri = None,
    as_json: JsonOut = False,
) -> None:
    """The whole job: train and register, promote by evaluation, classify sample digits."""
    from mnistflow.pipeline import run_pipeline

    train_config = preset_config(preset.value, epochs=epochs, seed=seed, device=device.value)
    tracking_config = TrackingConfig(
        tracking_uri=tracking_uri,
        description="mnistflow pipeline: train, register, promote.",
        tags={"job": "pipeline"},
    )
    bar = ProgressBar(err)
    try:
        result = run_pipeline(
            DataConfig(limit_train=limit_train),
            train_config,
            tracking_config,
            model_name,
            min_accuracy,
            margin,
            samples,
            bar,
        )
    finally:
        bar.stop()
    if as_json:
        print_result(result, True, "")
        return
    print_result(result["train"], False, "Training run")
    print_decision(result["promotion"])
    s = result["samples"]
    out.print(
        f"Sample digits in {s['folder']}/: true {s['true']}, predicted {s['predicted']} "
        f"({s['correct']}/{len(s['true'])} right)."
    )
    err.print(
        "Next: [bold]mnistflow ui[/] to browse runs and models; "
        f"[bold]mnistflow predict {s['folder']}[/] for your own images; "
        "[bold]mnistflow serve[/] for the HTTP service and draw-a-digit page."
    )
