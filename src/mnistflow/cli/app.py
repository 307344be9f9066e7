"""The `mnistflow` program: the Typer app, its commands in the order `--help` lists them,
and the error handling every command runs under: an expected failure ends with one sentence
on stderr and an exit code, never a traceback; Ctrl-C says what it left."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar, overload

import typer
from rich.markup import escape

from mnistflow.cli import models, predict, store, sweep, training
from mnistflow.cli.output import err
from mnistflow.config import MnistflowError
from mnistflow.store.uris import redact

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

F = TypeVar("F", bound=Callable[..., Any])


# What Ctrl-C leaves behind, said by each command (see friendly_errors).
STOPPED = "the command stopped before it finished."


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
                # Imported here: keeps torch and MLflow out of `mnistflow --help`'s start-up.
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
    # Imported here: keeps torch and MLflow out of `mnistflow --help`'s start-up.
    import mlflow

    from mnistflow.store import remote

    if answered_only and remote.status_of(error) is None:
        return None
    return remote.sentence(error, str(mlflow.get_tracking_uri()))


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


# -- the commands, in the order --help lists them, each with what is true after Ctrl-C --

COMMANDS: tuple[tuple[Callable[..., Any], str], ...] = (
    (
        training.train,
        "the training run, if it had started, was ended as KILLED with everything logged so far.",
    ),
    (
        training.baseline,
        "the baseline run, if it had started, was ended as KILLED with everything logged so far.",
    ),
    (store.ui, "the MLflow UI was not started."),
    (
        models.register,
        "registration may have stopped part-way; check the model's versions and "
        "@challenger with mnistflow ui.",
    ),
    (
        models.rollback,
        "the rollback may have stopped part-way; check where @champion points with mnistflow ui.",
    ),
    (predict.serve, "the server was stopped."),
    (
        models.promote,
        "@champion and @challenger moved only if the decision had been reached; "
        "the evaluation run was ended.",
    ),
    (predict.predict, "prediction stopped; no model or tracking store was changed."),
    (
        training.pipeline,
        "the training run, if it had started, was ended as KILLED with everything "
        "logged so far; the later steps (register, promote, sample digits) may not have run.",
    ),
    (store.doctor, STOPPED),
    (training.sync, "the sync stopped part-way; run mnistflow sync again to complete it."),
    (
        sweep.sweep,
        "the sweep stopped: running trials ended KILLED, the parent run keeps what "
        "it has; run the same command with --study to resume the study.",
    ),
)
for command, interrupted in COMMANDS:
    app.command()(friendly_errors(interrupted=interrupted)(command))
