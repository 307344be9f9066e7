"""Commands that move a registered model's versions and aliases: register, rollback, promote."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import typer
from rich.table import Table

from mnistflow.cli.options import (
    JsonOut,
    Margin,
    MinAccuracy,
    MinWritersAccuracy,
    ModelName,
    TrackingUri,
)
from mnistflow.cli.output import out, print_result
from mnistflow.config import MODEL_NAME


def register(
    run_id: Annotated[str, typer.Argument(help="The training run whose model to register.")],
    model_name: ModelName = MODEL_NAME,
    tracking_uri: TrackingUri = None,
    as_json: JsonOut = False,
) -> None:
    """Register a finished run's model as a new version (it gets @challenger)."""
    # Imported here: keeps torch and MLflow out of `mnistflow --help`'s start-up.
    from mnistflow.lifecycle import registry
    from mnistflow.store.checks import use_store

    uri = use_store(tracking_uri)
    mv = registry.register(registry.client_for(uri), run_id, model_name)
    result = {"model_name": model_name, "version": str(mv.version), "run_id": run_id}
    print_result({**result, "description": mv.description}, as_json, "Registered")


def rollback(
    model_name: ModelName = MODEL_NAME,
    tracking_uri: TrackingUri = None,
    as_json: JsonOut = False,
) -> None:
    """Move @champion back to the previous champion."""
    # Imported here: keeps torch and MLflow out of `mnistflow --help`'s start-up.
    from mnistflow.lifecycle import registry
    from mnistflow.store.checks import use_store

    uri = use_store(tracking_uri)
    was, now = registry.rollback(registry.client_for(uri), model_name)
    result = {"model_name": model_name, "rolled_back_from": was, "champion_version": now}
    print_result(result, as_json, "Rollback")


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


def promote(
    model_name: ModelName = MODEL_NAME,
    version: Annotated[
        str | None,
        typer.Option(
            help="Version to consider (default: the one @challenger points at).", show_default=False
        ),
    ] = None,
    min_accuracy: MinAccuracy = 0.99,
    min_writers_accuracy: MinWritersAccuracy = 0.9,
    margin: Margin = 0.002,
    tracking_uri: TrackingUri = None,
    as_json: JsonOut = False,
) -> None:
    """Evaluate @challenger against @champion on the test set; move @champion if it passes."""
    # Imported here: keeps torch and MLflow out of `mnistflow --help`'s start-up.
    from mnistflow.lifecycle.promotion import promote as run_promotion
    from mnistflow.store.checks import use_store

    uri = use_store(tracking_uri)
    decision = run_promotion(
        uri,
        model_name,
        version=version,
        min_accuracy=min_accuracy,
        min_writers_accuracy=min_writers_accuracy,
        margin=margin,
    ).as_dict()
    if as_json:
        print_result(decision, True, "")
    else:
        print_decision(decision)
