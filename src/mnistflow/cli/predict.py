"""Commands that use a logged model: predict (local or on Spark) and serve (HTTP)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from mnistflow.cli.options import EnvManager, PredictEngine, TrackingUri
from mnistflow.cli.output import err
from mnistflow.config import MODEL_NAME, MnistflowError


def use_store_of(model_uri: str, tracking_uri: str | None) -> None:
    """Point MLflow at the store a model URI needs (models:/, runs:/), refusing one that does
    not exist; a model given by path needs no store."""
    # Imported here: keeps torch and MLflow out of `mnistflow --help`'s start-up.
    from mnistflow.store.checks import resolve_tracking_uri, use_store

    if model_uri.startswith(("models:/", "runs:/")):
        use_store(tracking_uri)
    else:
        resolve_tracking_uri(tracking_uri)


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
    max_batch: Annotated[
        int,
        typer.Option(min=1, help="Most digits in one model call (concurrent requests share one)."),
    ] = 64,
    batch_wait_ms: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=100.0,
            help="How long a request may wait for others to share its model call "
            "(0: only requests that arrived together).",
        ),
    ] = 0.0,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Server processes sharing the port, each with its own copy of the model.",
        ),
    ] = 1,
    access_log: Annotated[bool, typer.Option(help="Log every request (costs ~10%).")] = False,
    tracking_uri: TrackingUri = None,
) -> None:
    """Serve the model over HTTP: predict endpoints, health, metrics, a draw-a-digit page."""
    # Imported here: keeps torch and MLflow out of `mnistflow --help`'s start-up.
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
            max_batch=max_batch,
            batch_wait_ms=batch_wait_ms,
            workers=workers,
            access_log=access_log,
        )
    )


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
    # Imported here: keeps torch and MLflow out of `mnistflow --help`'s start-up.
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
    abstain_below = getattr(classifier, "abstain_below", None)
    results = batch.rows(digits, labels, probabilities, abstain_below)
    batch.write(results, target)
    known = digits.all_labels()
    summary = f"{len(digits)} digits classified with {model_uri}"
    if known is not None:
        summary += f"; accuracy {float((labels == known).mean()):.2%} against the known labels"
    if abstain_below is not None:
        summary += f"; not sure of {sum(row['abstain'] for row in results)}"
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
    # Imported here: keeps torch and MLflow out of `mnistflow --help`'s start-up.
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
