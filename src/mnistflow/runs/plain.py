"""A training run of the plain loop (engines.plain), recorded as one MLflow run."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from mnistflow import data
from mnistflow.config import (
    DataConfig,
    TrackingConfig,
    TrainConfig,
    validate,
)
from mnistflow.engines.plain import fit, resolve
from mnistflow.recording import (
    TrainSummary,
    ask_registration,
    record_inputs,
    record_outcome,
    resolved_config,
    settle,
    summarize,
)
from mnistflow.reporting import Reporter, Tee
from mnistflow.tracking import TrackedRun


def train_run(
    data_config: DataConfig,
    train_config: TrainConfig,
    tracking_config: TrackingConfig,
    progress: Reporter | None = None,
    register_as: str | None = None,
    splits: data.MnistSplits | None = None,
) -> TrainSummary:
    """Train on MNIST, evaluate on the test set, and record all of it (the models too) as
    one MLflow run.

    register_as: then register the served model under this name (it becomes @challenger).
    splits: MNIST already loaded with data_config (else loaded here).
    """
    started = time.perf_counter()
    validate(train_config)
    splits = splits or data.load(data_config)
    train_config = resolve(train_config)  # the device and precision really used
    resolved = resolved_config(data_config, train_config, tracking_config, splits)

    with (
        tempfile.TemporaryDirectory(prefix="mnistflow-") as tmp,
        TrackedRun(tracking_config) as run,
    ):
        ask_registration(run, register_as)
        workdir = Path(tmp)
        record_inputs(
            run, resolved, splits, workdir,
            preset=train_config.preset, device=train_config.device, tags=tracking_config.tags,
        )  # fmt: skip
        result = fit(
            train_config, splits.train, splits.val, Tee(run, progress) if progress else run
        )
        outcome = record_outcome(
            run, result.model, splits, resolved, workdir, result.step_losses, result.history,
            result.train_seconds,
        )  # fmt: skip
        summary = summarize(
            run,
            started,
            preset=train_config.preset,
            device=train_config.device,
            test_accuracy=outcome.test_accuracy,
            test_macro_f1=outcome.test_macro_f1,
            train_seconds=result.train_seconds,
            model_uri=outcome.models.model_uri,
        )
    return settle(run, summary, register_as, outcome.models.model_id)
