"""What the commands print: the consoles (results on stdout, the rest on stderr), result
tables and --json's line, the training progress bar, and the exit codes beyond 0 and 1."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from mnistflow.reporting import Reporter
from mnistflow.store.uris import redact

# Progress and messages go to stderr, so stdout carries only results (and --json's line).
err = Console(stderr=True)


out = Console(highlight=False)


# The exit code of a command whose run trained but is kept in the local spool, not yet in
# its store (EX_TEMPFAIL of sysexits.h: try again later, here with `mnistflow sync`).
KEPT_IN_SPOOL = 75


NOT_PROMOTED = (
    "Nothing was promoted: the new model is registered only once its run is sent; then run "
    "mnistflow promote."
)


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
