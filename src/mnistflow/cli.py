"""The `mnistflow` command: parses arguments, calls the library, prints results.

Expected failures (bad input, unreachable store, missing data) end with one sentence on
stderr and a non-zero exit code; Ctrl-C exits 130 and says what it left behind (a training
run ends as KILLED); a run kept in the local spool for `mnistflow sync` exits 75.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from enum import Enum, StrEnum
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any, TypeVar, overload

import typer
from rich.console import Console
from rich.markup import escape
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
from mnistflow.store.uris import redact

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


class PredictEngine(StrEnum):
    local = "local"
    spark = "spark"


class EnvManager(StrEnum):
    local = "local"
    virtualenv = "virtualenv"
    uv = "uv"
    conda = "conda"


class DeviceChoice(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class PrecisionChoice(StrEnum):
    auto = "auto"
    bf16 = "bf16"
    fp32 = "fp32"


F = TypeVar("F", bound=Callable[..., Any])


# What Ctrl-C leaves behind, said by each command (see friendly_errors).
STOPPED = "the command stopped before it finished."
# The exit code of a command whose run trained but is kept in the local spool, not yet in
# its store (EX_TEMPFAIL of sysexits.h: try again later, here with `mnistflow sync`).
KEPT_IN_SPOOL = 75
NOT_PROMOTED = (
    "Nothing was promoted: the new model is registered only once its run is sent; then run "
    "mnistflow promote."
)


@overload
def friendly_errors(command: F) -> F: ...


@overload
def friendly_errors(*, interrupted: str) -> Callable[[F], F]: ...


def friendly_errors(command: F | None = None, *, interrupted: str = STOPPED) -> Any:
    """Turn expected failures into one line on stderr and an exit code, never a traceback.

    interrupted: what is true after Ctrl-C, printed after "Interrupted:" (exit code 130).
    """

    def decorate(command: F) -> F:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return command(*args, **kwargs)
            except MnistflowError as e:
                from mnistflow.tracking import fail_project_run

                # A tracking server's 401/403/5xx behind it says more than the wrapping
                # sentence; a request that got no answer at all is already said well by ours.
                sentence = redact(_refusal(e, answered_only=True) or str(e))
                # Under `mlflow run`, a failure before our run started still ends its run,
                # with why.
                fail_project_run(sentence)
                # Escaped: a sentence may hold brackets (pip install 'mnistflow[team]') that
                # rich would take for markup.
                err.print(f"[bold red]Error:[/] {escape(sentence)}", soft_wrap=True)
                raise typer.Exit(1) from None
            except KeyboardInterrupt:
                err.print(f"[yellow]Interrupted:[/] {interrupted}", soft_wrap=True)
                raise typer.Exit(130) from None
            except Exception as e:
                refusal = _refusal(e)
                if refusal is None:
                    raise
                err.print(f"[bold red]Error:[/] {escape(redact(refusal))}", soft_wrap=True)
                raise typer.Exit(1) from None

        return wrapper  # type: ignore[return-value]

    return decorate(command) if command is not None else decorate


def _refusal(error: BaseException, answered_only: bool = False) -> str | None:
    """One sentence when error comes from a tracking server's 401, 403 or 5xx (or, unless
    answered_only, a request it broke off), else None."""
    import mlflow

    from mnistflow.store import remote

    if answered_only and remote.status_of(error) is None:
        return None
    return remote.sentence(error, str(mlflow.get_tracking_uri()))


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
            # Steps arrive in blocks of log_every_steps (a few tenths of a second apart), so
            # rich's default 10 redraws a second mostly redraw the clock; each redraw is Python
            # on a thread that takes the GIL from the training loop (0.12-0.17 s of CPU per
            # default run at 10 Hz, measured per thread). Twice a second is as smooth here.
            refresh_per_second=2,
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
    """A small table for people, or one JSON object as the last line of stdout; URIs in it
    are shown without their passwords."""
    result = _redacted(result)
    if as_json:
        out.print(json.dumps(result, default=str), soft_wrap=True)
        return
    table = Table(title=title, show_header=False, title_justify="left")
    for key, value in result.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        table.add_row(key, shown)
    out.print(table)


def _redacted(value: Any) -> Any:
    """value (a result: mappings, lists, strings, numbers) with every string redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {key: _redacted(inner) for key, inner in value.items()}
    if isinstance(value, list | tuple):
        return [_redacted(inner) for inner in value]
    return value


@app.callback()
def main() -> None:
    """An MNIST classifier whose whole life runs on MLflow: train, track, register, serve."""
    # MLflow's INFO lines would drown the progress bar; its warnings still show.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    # Lightning's INFO lines (devices found, tips, "max_epochs reached") likewise.
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    # MLflow prints "View run ... at: <tracking URI>" when a run on a server ends, with the
    # login in it when the URI carries one; our commands say where the run is themselves.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def use_store_of(model_uri: str, tracking_uri: str | None) -> None:
    """Point MLflow at the store a model URI needs (models:/, runs:/), refusing one that does
    not exist; a model given by path needs no store."""
    from mnistflow.store.checks import resolve_tracking_uri, use_store

    if model_uri.startswith(("models:/", "runs:/")):
        use_store(tracking_uri)
    else:
        resolve_tracking_uri(tracking_uri)


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
PrecisionOption = Annotated[
    PrecisionChoice | None,
    typer.Option(
        help="Training arithmetic: bf16 mixed precision or fp32 (default: the preset's; auto "
        "takes bf16 where the hardware runs it natively).",
        show_default=False,
    ),
]
LimitTrain = Annotated[
    int | None,
    typer.Option(min=1, help="Train on only the first N training images (fast mode)."),
]
JsonOut = Annotated[
    bool, typer.Option("--json", help="Print the result as one JSON object on the last line.")
]


@app.command()
@friendly_errors(
    interrupted="the training run, if it had started, was ended as KILLED with everything "
    "logged so far."
)
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
    precision: PrecisionOption = None,
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
    require_server: Annotated[
        bool,
        typer.Option(
            help="Fail when the tracking store cannot take the run at the start (a server that "
            "does not answer; an embedded store whose disk is full or that cannot be written), "
            "instead of training into the local spool."
        ),
    ] = False,
    wait_for_server: Annotated[
        float,
        typer.Option(
            min=0,
            help="With a tracking server that went away: seconds the end of the command waits "
            "for it before leaving the run in the spool for `mnistflow sync`.",
        ),
    ] = 60.0,
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
    """Train a model on MNIST and record the run (and its model) in MLflow.

    Exit code 0: the run is in its store; 75: it trained, but waits in the local spool for
    `mnistflow sync` (the store was away).
    """
    from mnistflow.runs.plain import train_run

    if engine is Engine.plain and (devices > 1 or num_nodes > 1 or resume):
        flag = "--resume" if resume else "--devices" if devices > 1 else "--num-nodes"
        raise typer.BadParameter(
            "needs --engine lightning: the plain loop runs on one process and keeps no "
            "checkpoints.",
            param_hint=flag,
        )

    train_config = preset_config(
        preset.value, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device.value,
        precision=precision and precision.value,
    )  # fmt: skip
    tracking_config = TrackingConfig(
        tracking_uri=tracking_uri,
        experiment=experiment,
        run_name=run_name,
        description=description,
        tags=parse_tags(tag),
        async_logging=async_logging,
        system_metrics=system_metrics,
        require_server=require_server,
        wait_for_server_seconds=wait_for_server,
    )
    bar = ProgressBar(err)
    try:
        if engine is Engine.lightning:
            from mnistflow.runs import lightning

            lightning_summary = lightning.train_run(
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
    say_where(summary, as_json)


def say_where(summary: Any, as_json: bool, also: str = "") -> None:
    """Where a training run landed. A run kept in the local spool is said in one sentence
    (and also, when given) and exits KEPT_IN_SPOOL, so a script can tell it from a run in
    its store."""
    if summary.spooled:
        from mnistflow.store import remote

        reason = redact(
            summary.spool_reason or f"The tracking server at {summary.tracking_uri} did not answer."
        )
        err.print(
            f"[yellow]{reason}[/] The run is kept in the local spool; send it with "
            f"[bold]mnistflow sync[/] {remote.send_later(summary.tracking_uri)}.{also}",
            soft_wrap=True,
        )
        raise typer.Exit(KEPT_IN_SPOOL)
    if not as_json:
        err.print(f"See it in the MLflow UI: [bold]mnistflow ui[/] (run {summary.run_id}).")


@app.command()
@friendly_errors(
    interrupted="the baseline run, if it had started, was ended as KILLED with everything "
    "logged so far."
)
def baseline(
    seed: Seed = 0,
    limit_train: LimitTrain = None,
    pca_components: Annotated[
        int, typer.Option(min=1, max=784, help="Principal components kept from the 784 pixels.")
    ] = 50,
    c: Annotated[
        float, typer.Option("--c", help="Inverse regularisation strength of the regression.")
    ] = 1.0,
    max_iter: Annotated[int, typer.Option(min=1, help="Most solver iterations.")] = 200,
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
    system_metrics: Annotated[
        bool, typer.Option(help="Record CPU and memory use with MLflow's system metrics.")
    ] = True,
    register: Annotated[
        bool, typer.Option(help="Register the logged model; the new version gets @challenger.")
    ] = False,
    model_name: ModelName = MODEL_NAME,
    as_json: JsonOut = False,
) -> None:
    """Fit a scikit-learn baseline under MLflow autologging, recorded like a training run.

    Exit code 75: the run waits in the local spool for `mnistflow sync`, as with train.
    """
    from mnistflow.engines.sklearn import BaselineConfig
    from mnistflow.runs.baseline import baseline_run

    tracking_config = TrackingConfig(
        tracking_uri=tracking_uri,
        experiment=experiment,
        run_name=run_name,
        description=description,
        tags=parse_tags(tag),
        system_metrics=system_metrics,
    )
    err.print("Fitting the scikit-learn baseline (autologged)...")
    summary = baseline_run(
        DataConfig(limit_train=limit_train),
        BaselineConfig(pca_components=pca_components, c=c, max_iter=max_iter, seed=seed),
        tracking_config,
        register_as=model_name if register else None,
    )
    print_result(summary.as_dict(), as_json, "Baseline run")
    say_where(summary, as_json)


@app.command()
@friendly_errors
@friendly_errors(interrupted="the MLflow UI was not started.")
def ui(
    tracking_uri: TrackingUri = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 5000,
) -> None:
    """Open the MLflow UI on the same store the runs went to."""
    from mnistflow.store.checks import resolve_tracking_uri, use_store
    from mnistflow.store.uris import sqlite_path

    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith(("http://", "https://")):
        err.print(f"The tracking server serves its own UI: open {redact(uri)}")
        return
    use_store(uri)  # an existing store: the UI would create an empty one
    err.print(f"MLflow UI for {redact(uri)} at http://{host}:{port} (Ctrl-C stops it)")
    args = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
    args += ["--host", host, "--port", str(port)]
    database = sqlite_path(uri)
    if database is not None:
        # Runs logged without a server keep artifacts in ./mlruns beside the database.
        args += ["--default-artifact-root", str(database.parent / "mlruns")]
    os.execv(sys.executable, args)


@app.command()
@friendly_errors(
    interrupted="registration may have stopped part-way; check the model's versions and "
    "@challenger with mnistflow ui."
)
def register(
    run_id: Annotated[str, typer.Argument(help="The training run whose model to register.")],
    model_name: ModelName = MODEL_NAME,
    tracking_uri: TrackingUri = None,
    as_json: JsonOut = False,
) -> None:
    """Register a finished run's model as a new version (it gets @challenger)."""
    from mnistflow.lifecycle import registry
    from mnistflow.store.checks import use_store

    uri = use_store(tracking_uri)
    mv = registry.register(registry.client_for(uri), run_id, model_name)
    result = {"model_name": model_name, "version": str(mv.version), "run_id": run_id}
    print_result({**result, "description": mv.description}, as_json, "Registered")


@app.command()
@friendly_errors(
    interrupted="the rollback may have stopped part-way; check where @champion points with "
    "mnistflow ui."
)
def rollback(
    model_name: ModelName = MODEL_NAME,
    tracking_uri: TrackingUri = None,
    as_json: JsonOut = False,
) -> None:
    """Move @champion back to the previous champion."""
    from mnistflow.lifecycle import registry
    from mnistflow.store.checks import use_store

    uri = use_store(tracking_uri)
    was, now = registry.rollback(registry.client_for(uri), model_name)
    result = {"model_name": model_name, "rolled_back_from": was, "champion_version": now}
    print_result(result, as_json, "Rollback")


@app.command()
@friendly_errors(interrupted="the server was stopped.")
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

    use_store_of(model_uri, tracking_uri)
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
@friendly_errors(
    interrupted="@champion and @challenger moved only if the decision had been reached; "
    "the evaluation run was ended."
)
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
    from mnistflow.lifecycle.promotion import promote as run_promotion
    from mnistflow.store.checks import use_store

    uri = use_store(tracking_uri)
    decision = run_promotion(
        uri, model_name, version=version, min_accuracy=min_accuracy, margin=margin
    ).as_dict()
    if as_json:
        print_result(decision, True, "")
    else:
        print_decision(decision)


@app.command()
@friendly_errors(interrupted="prediction stopped; no model or tracking store was changed.")
def predict(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="PNG/JPEG files, folders of them, .npy arrays (N, 28, 28) or MNIST IDX files; "
            "with --engine spark also Parquet datasets, globs and any file system Spark reads.",
            show_default=False,
        ),
    ],
    model_uri: Annotated[
        str, typer.Option(help="Model to use.")
    ] = f"models:/{MODEL_NAME}@champion",
    output: Annotated[
        str | None,
        typer.Option(
            help="Write results here: .csv or .json; with --engine spark also .parquet (a "
            "folder Spark writes) (default: CSV on stdout).",
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Digits per model call.")] = 1024,
    tracking_uri: TrackingUri = None,
    engine: Annotated[
        PredictEngine,
        typer.Option(
            help="local: in this process; spark: a Spark job through mlflow.pyfunc.spark_udf "
            "(needs the spark extra and Java)."
        ),
    ] = PredictEngine.local,
    master: Annotated[
        str | None,
        typer.Option(
            help="Spark master URL (default: the one spark-submit gives, else local[*]).",
            show_default=False,
        ),
    ] = None,
    column: Annotated[
        str | None,
        typer.Option(
            help="Parquet column holding image bytes or pixels (default: the only binary or "
            "array column, else 784 pixel columns).",
            show_default=False,
        ),
    ] = None,
    env_manager: Annotated[
        EnvManager,
        typer.Option(
            help="How Spark executors get the model's requirements: local (already installed) "
            "or built by virtualenv, uv or conda."
        ),
    ] = EnvManager.local,
) -> None:
    """Classify digits with a logged model (the champion by default).

    Exit code 0: all inputs classified; 3: some inputs could not be read (listed on stderr),
    the rest were classified.
    """
    from mnistflow.inference import batch

    if engine is PredictEngine.spark:
        _predict_on_spark(
            inputs, model_uri, output, batch_size, tracking_uri, master, column, env_manager
        )
        return
    if master is not None or column is not None or env_manager is not EnvManager.local:
        raise MnistflowError("--master, --column and --env-manager apply to --engine spark only.")
    target = None if output is None else Path(output)
    batch.check_output(target)  # before any work: a bad path must not cost a whole run
    use_store_of(model_uri, tracking_uri)
    digits = batch.collect(Path(p) for p in inputs)
    for source, reason in digits.failures:
        err.print(f"[yellow]skipped[/] {escape(source)}: {escape(reason)}", soft_wrap=True)
    if not len(digits):
        raise MnistflowError("None of the inputs could be read as a digit.")
    classifier, _ = batch.load_classifier(model_uri)
    with Progress(
        TextColumn("[bold]predict"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task("predict", total=len(digits))
        labels, probabilities = batch.classify(
            classifier, digits.all_pixels(), batch_size, lambda n: bar.advance(task, n)
        )
    batch.write(batch.rows(digits, labels, probabilities), target)
    known = digits.all_labels()
    summary = f"{len(digits)} digits classified with {model_uri}"
    if known is not None:
        summary += f"; accuracy {float((labels == known).mean()):.2%} against the known labels"
    err.print(summary + (f"; written to {output}" if output else "") + ".")
    if digits.failures:
        err.print(f"[yellow]{len(digits.failures)} input(s) could not be read.[/]")
        raise typer.Exit(3)


def _predict_on_spark(
    inputs: list[str],
    model_uri: str,
    output: str | None,
    batch_size: int,
    tracking_uri: str | None,
    master: str | None,
    column: str | None,
    env_manager: EnvManager,
) -> None:
    """predict --engine spark: the same report and exit codes as the local path."""
    from mnistflow.inference import spark

    if (missing := spark.missing_requirements()) is not None:
        raise MnistflowError(missing)
    spark.check_output(output)
    use_store_of(model_uri, tracking_uri)
    # Spark draws its own progress bar on stderr.
    result = spark.predict(inputs, model_uri, output, master, column, env_manager.value, batch_size)
    for source, reason in result.failures:
        err.print(f"[yellow]skipped[/] {escape(source)}: {escape(reason)}", soft_wrap=True)
    if result.failed > len(result.failures):
        err.print(
            f"[yellow]… and {result.failed - len(result.failures)} more[/] (see the error column)."
        )
    version = f" (version {result.model.version})" if result.model.version else ""
    summary = (
        f"{result.total - result.failed} digits classified with {result.model.uri}{version} "
        f"from {result.model.asked} on Spark {result.master}"
    )
    if result.accuracy is not None:
        summary += f"; accuracy {result.accuracy:.2%} against the known labels"
    err.print(summary + (f"; written to {output}" if output else "") + ".", soft_wrap=True)
    if result.failed == result.total:
        raise MnistflowError("None of the inputs could be read as a digit.")
    if result.failed:
        err.print(f"[yellow]{result.failed} input(s) could not be read.[/]")
        raise typer.Exit(3)


@app.command()
@friendly_errors(
    interrupted="the training run, if it had started, was ended as KILLED with everything "
    "logged so far; the later steps (register, promote, sample digits) may not have run."
)
def pipeline(
    preset: PresetOption = Preset["fast"],
    epochs: Epochs = None,
    seed: Seed = 0,
    device: DeviceOption = DeviceChoice.auto,
    precision: PrecisionOption = None,
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
    """The whole job: train and register, promote by evaluation, classify sample digits.

    Exit code 75: the run waits in the local spool for `mnistflow sync`; nothing was promoted.
    """
    from mnistflow.pipeline import run_pipeline

    train_config = preset_config(
        preset.value, epochs=epochs, seed=seed, device=device.value,
        precision=precision and precision.value,
    )  # fmt: skip
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
    if result["promotion"] is None:
        # The new model waits in the spool, unregistered: nothing was promoted.
        print_result(result if as_json else result["train"], as_json, "Training run")
        summary = SimpleNamespace(**result["train"])
        say_where(summary, True, f" {NOT_PROMOTED}")
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


@app.command()
@friendly_errors
def doctor(
    tracking_uri: TrackingUri = None,
    experiment: Annotated[
        str, typer.Option(help="Experiment to test writing to (a scratch run, then deleted).")
    ] = "mnist",
) -> None:
    """Check the tracking setup: server and version, login for reading and writing, artifacts."""
    from mnistflow.stack.doctor import run_checks
    from mnistflow.store.checks import resolve_tracking_uri

    checks = run_checks(resolve_tracking_uri(tracking_uri), experiment)
    for check in checks:
        mark = "[green]ok  [/]" if check.ok else "[bold red]FAIL[/]"
        out.print(f"{mark} {check.name:<9} {redact(check.text)}", soft_wrap=True)
    if not all(check.ok for check in checks):
        raise typer.Exit(1)


@app.command()
@friendly_errors(interrupted="the sync stopped part-way; run mnistflow sync again to complete it.")
def sync(
    list_only: Annotated[
        bool, typer.Option("--list", help="Only show the runs waiting in the spool.")
    ] = False,
    tracking_uri: Annotated[
        str | None,
        typer.Option(help="Only the runs meant for this tracking server.", show_default=False),
    ] = None,
    as_json: JsonOut = False,
) -> None:
    """Send the runs kept in the local spool (the server was away) to their tracking server.

    Each run is sent on its own: one that cannot be sent (its store away, its run deleted
    there) waits in the spool with why, and the others are sent. A run whose training
    process died is sent with what it had logged and ended FAILED. Exit code 1: some runs
    still wait.
    """
    from mnistflow.spool import targets
    from mnistflow.spool.sync import pending
    from mnistflow.spool.sync import sync as send_waiting
    from mnistflow.store import uris

    if list_only:
        waiting = [
            {
                "spool_run_id": r.info.run_id,
                "run_name": r.info.run_name,
                "status": r.info.status,
                "server": r.data.tags[targets.TARGET],
                "server_run_id": r.data.tags.get(targets.REMOTE_RUN),
            }
            for r in pending()
            if not tracking_uri
            or r.data.tags[targets.TARGET] == targets.recorded_target(tracking_uri)
        ]
        if as_json:
            print_result({"pending": waiting}, True, "")
            return
        table = Table(title=f"Waiting in {uris.spool_dir()}", title_justify="left")
        for column in ("spool run", "name", "status", "target", "target run"):
            table.add_column(column)
        for row in waiting:
            table.add_row(*(redact(str(v or "-")) for v in row.values()))
        out.print(table)
        return
    results = send_waiting(target=tracking_uri)
    rows = [dataclasses.asdict(r) for r in results]
    if as_json:
        print_result({"synced": rows}, True, "")
    else:
        for r in results:
            state = "[green]sent[/]" if r.complete else f"[yellow]waiting[/] ({r.error})"
            line = f"{r.spool_run_id} -> {r.target} run {r.remote_run_id or '-'}: {state}"
            out.print(redact(line + (f" {r.note}" if r.note else "")), soft_wrap=True)
        if not results:
            out.print("Nothing waits in the spool.")
    if any(not r.complete for r in results):
        raise typer.Exit(1)


@app.command()
@friendly_errors(
    interrupted="the sweep stopped: running trials ended KILLED, the parent run keeps what "
    "it has; run the same command with --study to resume the study."
)
def sweep(
    trials: Annotated[
        int, typer.Option(min=1, help="Trials this command runs, split over its workers.")
    ] = 20,
    timeout: Annotated[
        float | None,
        typer.Option(min=0.001, help="Start no trial after this many seconds.", show_default=False),
    ] = None,
    workers: Annotated[
        int, typer.Option(min=1, help="Local worker processes sharing the study.")
    ] = 1,
    study: Annotated[
        str, typer.Option(help="Study name; an existing study is joined (or resumed).")
    ] = "mnist-sweep",
    storage: Annotated[
        str | None,
        typer.Option(
            help="Where the study lives: a journal file path (default: ./optuna-journal.log), "
            "sqlite:///FILE, or postgresql://USER@HOST/DB to share it between machines.",
            show_default=False,
        ),
    ] = None,
    preset: Annotated[
        Preset | None,  # type: ignore[valid-type]
        typer.Option(help="Base recipe the trials vary (default: fast).", show_default=False),
    ] = None,
    epochs: Epochs = None,
    limit_train: LimitTrain = None,
    space: Annotated[
        Path | None,
        typer.Option(
            help="YAML file replacing the search space (default: lr, batch size, weight decay, "
            "label smoothing, width).",
            show_default=False,
        ),
    ] = None,
    pruner: Annotated[
        str | None,
        typer.Option(help="median (default), halving or none.", show_default=False),
    ] = None,
    sampler_seed: Annotated[
        int | None,
        typer.Option(help="Seed of the TPE sampler (worker i uses seed+i).", show_default=False),
    ] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment of a new study.")] = "mnist",
    tracking_uri: TrackingUri = None,
    system_metrics: Annotated[
        bool, typer.Option(help="Record system metrics in every trial's run.")
    ] = False,
    register: Annotated[
        bool, typer.Option(help="Register the best trial's model; it gets @challenger.")
    ] = False,
    model_name: ModelName = MODEL_NAME,
    as_json: JsonOut = False,
) -> None:
    """Search hyperparameters with Optuna: one parent run, a child run per trial, pruning.

    The best trial is chosen on validation accuracy; only its model is tested and logged.

    --preset, --epochs, --limit-train, --space and --pruner are stored with a new study;
    commands that join it may leave them out.
    """
    from mnistflow.sweep.definition import SweepConfig, SweepDefinition
    from mnistflow.sweep.space import SearchSpace, load_space
    from mnistflow.sweep.study import run_sweep

    given = (preset, epochs, limit_train, space, pruner)
    definition = None
    if any(value is not None for value in given):
        definition = SweepDefinition(
            preset=preset.value if preset is not None else "fast",
            epochs=epochs,
            limit_train=limit_train,
            space=load_space(space) if space is not None else SearchSpace(),
            pruner=pruner or "median",  # type: ignore[arg-type]
        )
    config = SweepConfig(
        study=study,
        storage=storage,
        trials=trials,
        timeout=timeout,
        workers=workers,
        definition=definition,
        register_as=model_name if register else None,
        sampler_seed=sampler_seed,
    )
    tracking_config = TrackingConfig(
        tracking_uri=tracking_uri,
        experiment=experiment,
        description=f"Optuna study {study}: one child run per trial.",
        system_metrics=system_metrics,
    )
    summary = run_sweep(config, tracking_config)
    result = summary.as_dict()
    if as_json:
        print_result(result, True, "")
        return
    print_result(result, False, f"Sweep {study}")
    err.print(
        f"See it in the MLflow UI: [bold]mnistflow ui[/] (parent run {summary.parent_run_id})."
    )
