"""What training reports, and to whom: the trainer calls a Reporter, never MLflow directly.

Kept free of torch and MLflow so that anything (the CLI's progress bar, a test's recorder,
the MLflow run) can listen without paying for their imports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


class Reporter:
    """Receives progress from fit(); the base class ignores it (tracking switched off)."""

    def start(self, total_steps: int) -> None:
        """Called once before the first step."""

    def log_steps(
        self, first_step: int, series: Mapping[str, Sequence[float]], timestamps_ms: Sequence[int]
    ) -> None:
        """A block of consecutive steps: series[name][i] belongs to step first_step + i."""

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Metrics of a finished epoch (1-based)."""


class Tee(Reporter):
    """Hands everything to several reporters (e.g. MLflow and a progress bar)."""

    def __init__(self, *reporters: Reporter) -> None:
        self.reporters = reporters

    def start(self, total_steps: int) -> None:
        for r in self.reporters:
            r.start(total_steps)

    def log_steps(
        self, first_step: int, series: Mapping[str, Sequence[float]], timestamps_ms: Sequence[int]
    ) -> None:
        for r in self.reporters:
            r.log_steps(first_step, series, timestamps_ms)

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        for r in self.reporters:
            r.log_epoch(epoch, metrics)
