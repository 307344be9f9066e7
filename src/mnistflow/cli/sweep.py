"""The sweep command: an Optuna search, one parent run and a child run per trial."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mnistflow.cli.options import Epochs, JsonOut, LimitTrain, ModelName, Preset, TrackingUri
from mnistflow.cli.output import err, print_result
from mnistflow.config import MODEL_NAME, TrackingConfig


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
    # Imported here: keeps torch and MLflow out of `mnistflow --help`'s start-up.
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
