"""Commands that train and record runs: train, baseline, pipeline, and sync (the runs that
wait in the local spool)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any

import typer
from rich.table import Table

from mnistflow.cli.models import print_decision
from mnistflow.cli.options import (
    Description,
    DeviceChoice,
    DeviceOption,
    Engine,
    Epochs,
    Experiment,
    JsonOut,
    LimitTrain,
    Margin,
    Members,
    MinAccuracy,
    MinWritersAccuracy,
    ModelName,
    PrecisionOption,
    Preset,
    PresetOption,
    Register,
    RunName,
    Seed,
    Tags,
    TrackingUri,
    parse_tags,
)
from mnistflow.cli.output import KEPT_IN_SPOOL, NOT_PROMOTED, ProgressBar, err, out, print_result
from mnistflow.config import MODEL_NAME, DataConfig, TrackingConfig, preset_config
from mnistflow.store.uris import redact


def train(
    preset: PresetOption = Preset["fast"],
    epochs: Epochs = None,
    members: Members = None,
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
    experiment: Experiment = "mnist",
    run_name: RunName = None,
    description: Description = None,
    tag: Tags = None,
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
    register: Register = False,
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
    # Imported here: keeps torch and MLflow out of `mnistflow --help`'s start-up.
    from mnistflow.runs.plain import train_run

    if engine is Engine.plain and (devices > 1 or num_nodes > 1 or resume):
        flag = "--resume" if resume else "--devices" if devices > 1 else "--num-nodes"
        raise typer.BadParameter(
            "needs --engine lightning: the plain loop runs on one process and keeps no "
            "checkpoints.",
            param_hint=flag,
        )

    train_config = preset_config(
        preset.value, epochs=epochs, members=members, batch_size=batch_size, lr=lr, seed=seed,
        device=device.value, precision=precision and precision.value,
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
            # Imported here: keeps torch and MLflow out of `mnistflow --help`'s start-up.
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
        # Imported here: keeps torch and MLflow out of `mnistflow --help`'s start-up.
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
    experiment: Experiment = "mnist",
    run_name: RunName = None,
    description: Description = None,
    tag: Tags = None,
    tracking_uri: TrackingUri = None,
    system_metrics: Annotated[
        bool, typer.Option(help="Record CPU and memory use with MLflow's system metrics.")
    ] = True,
    register: Register = False,
    model_name: ModelName = MODEL_NAME,
    as_json: JsonOut = False,
) -> None:
    """Fit a scikit-learn baseline under MLflow autologging, recorded like a training run.

    Exit code 75: the run waits in the local spool for `mnistflow sync`, as with train.
    """
    # Imported here: keeps torch and MLflow out of `mnistflow --help`'s start-up.
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


def pipeline(
    preset: PresetOption = Preset["fast"],
    epochs: Epochs = None,
    members: Members = None,
    seed: Seed = 0,
    device: DeviceOption = DeviceChoice.auto,
    precision: PrecisionOption = None,
    limit_train: LimitTrain = None,
    model_name: ModelName = MODEL_NAME,
    min_accuracy: MinAccuracy = 0.99,
    min_writers_accuracy: MinWritersAccuracy = 0.9,
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
    # Imported here: keeps torch and MLflow out of `mnistflow --help`'s start-up.
    from mnistflow.pipeline import run_pipeline

    train_config = preset_config(
        preset.value, epochs=epochs, members=members, seed=seed, device=device.value,
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
            min_writers_accuracy=min_writers_accuracy,
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
    if s is None:
        err.print(
            f"No sample digits: {model_name} has no @champion to answer them yet. Next: "
            "[bold]mnistflow ui[/] to see why the model was refused (the promote run)."
        )
        return
    out.print(
        f"Sample digits in {s['folder']}/: true {s['true']}, predicted {s['predicted']} "
        f"({s['correct']}/{len(s['true'])} right)."
    )
    err.print(
        "Next: [bold]mnistflow ui[/] to browse runs and models; "
        f"[bold]mnistflow predict {s['folder']}[/] for your own images; "
        "[bold]mnistflow serve[/] for the HTTP service and draw-a-digit page."
    )


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
    # Imported here: keeps torch and MLflow out of `mnistflow --help`'s start-up.
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
