"""A Lightning training run recorded by MLflow's autolog, plus what every mnistflow run has.

Rank 0 starts our run first (TrackedRun: config, tags, datasets), turns on
`mlflow.pytorch.autolog`, which logs into that active run (params such as epochs and the
optimiser's settings, per-step and per-epoch metrics, the model summary), and after training
adds the test metrics, the served `model`, reports and weights (recording.record_outcome).

Under DDP only rank 0 talks to MLflow. Lightning's launcher starts the other local processes
by running the same command again; they find their config (and the checkpoint to resume
from) in MNISTFLOW_DDP_JOB, which rank 0 sets before launching them, and their tracking URI
points at a scheme no store serves, so any attempt to log from them fails the job loudly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mnistflow import data
from mnistflow.config import DataConfig, MnistflowError, TrackingConfig, TrainConfig, as_dict
from mnistflow.engines import lightning
from mnistflow.engines.plain import resolve
from mnistflow.recording import (
    TrainSummary,
    ask_registration,
    data_record,
    record_inputs,
    record_outcome,
    settle,
    summarize,
    tracking_record,
)
from mnistflow.reporting import Reporter
from mnistflow.store.checks import check_reachable, resolve_tracking_uri
from mnistflow.tracking import TrackedRun

if TYPE_CHECKING:
    import pytorch_lightning as pl

JOB_ENV = "MNISTFLOW_DDP_JOB"
# Where non-zero ranks "log": no tracking store is registered for this scheme.
NO_STORE = "rank-nonzero-must-not-log://"
LAST_CHECKPOINT = "checkpoints/last.ckpt"
NO_RESUME_HERE = (
    "--resume works with Lightning's own launcher (--devices N on one machine) only; under "
    "torchrun the other processes cannot get the checkpoint rank 0 downloads."
)
# Autolog's step metrics (train_loss, lr) every this many steps; 1 matches the plain loop.
LOG_EVERY_N_STEP = 1


def train_run(
    data_config: DataConfig,
    train_config: TrainConfig,
    tracking_config: TrackingConfig,
    devices: int = 1,
    num_nodes: int = 1,
    resume: str | None = None,
    progress: Reporter | None = None,
    register_as: str | None = None,
    callbacks: Sequence[pl.Callback] = (),
) -> TrainSummary | None:
    """Train with Lightning and record one MLflow run; None on every process but rank 0.

    resume: the id of an interrupted Lightning run to continue (same run, same config).
    callbacks: extra Lightning callbacks (the tests interrupt a run with one).
    """
    if devices < 1 or num_nodes < 1:
        raise MnistflowError("--devices and --num-nodes must be at least 1.")
    if train_config.members > 1:
        # The members are trained one after another by the plain loop (engines/plain.py);
        # Lightning's Trainer fits one LightningModule, and its DDP would not shorten that.
        raise MnistflowError(
            f"The Lightning engine trains one network, not an ensemble of "
            f"{train_config.members}: add --members 1, or train with --engine plain."
        )
    if resume and torch.distributed.is_torchelastic_launched():
        raise MnistflowError(NO_RESUME_HERE)
    if lightning.process_rank(devices) != 0:
        _follow(data_config, train_config, devices, num_nodes, resume, callbacks)
        return None

    with tempfile.TemporaryDirectory(prefix="mnistflow-lightning-") as folder:
        return _rank_zero(
            data_config, train_config, tracking_config, devices, num_nodes, resume, progress,
            callbacks, register_as, Path(folder),
        )  # fmt: skip


def _rank_zero(
    data_config: DataConfig,
    train_config: TrainConfig,
    tracking_config: TrackingConfig,
    devices: int,
    num_nodes: int,
    resume: str | None,
    progress: Reporter | None,
    callbacks: Sequence[pl.Callback],
    register_as: str | None,
    tmp: Path,
) -> TrainSummary:
    """The process that records the run: everything train_run promises, tmp its scratch folder."""
    started = time.perf_counter()
    checkpoint: Path | None = None
    if resume:
        tracking_config, train_config, data_config, checkpoint = _resumed(
            resume, tracking_config, data_config, tmp
        )
    splits = data.load(data_config)
    train_config = resolve(train_config)  # the device and precision really used
    device = train_config.device
    resolved = {
        "train": as_dict(train_config),
        "data": data_record(data_config, splits),
        "engine": {"name": "lightning", "devices": devices, "num_nodes": num_nodes},
        "tracking": tracking_record(tracking_config),
    }
    with TrackedRun(tracking_config) as run:
        ask_registration(run, register_as)
        if not resume:
            tags = {"engine": "lightning", "world_size": str(devices * num_nodes)}
            record_inputs(
                run, resolved, splits, tmp,
                preset=train_config.preset, device=device, tags={**tags, **tracking_config.tags},
            )  # fmt: skip

        # Autolog's own model would be named "model" too (it is not configurable), and
        # `register RUN_ID` looks the served model up by that name; log_models below logs
        # the same trained network as the `pytorch` flavour. Checkpoints are ours
        # (best by val_accuracy, and the last one for --resume).
        mlflow.pytorch.autolog(
            log_every_n_step=LOG_EVERY_N_STEP,
            log_models=False,
            log_datasets=False,
            checkpoint=False,
            silent=True,
        )
        # The other local processes read this when Lightning's launcher starts them.
        job = {"train": as_dict(train_config), "data": as_dict(data_config)}
        job["data"].pop("data_dir")
        os.environ[JOB_ENV] = json.dumps(
            {**job, "checkpoint": str(checkpoint) if checkpoint else None}
        )
        try:
            result = lightning.fit(
                train_config,
                splits.train,
                splits.val,
                splits.test,
                tmp / "checkpoints",
                devices,
                num_nodes,
                reporter=progress,
                on_checkpoint=lambda path: run.log_file(path, "checkpoints"),
                resume_from=checkpoint,
                callbacks=callbacks,
                before_test=_stop_autolog,
            )
        finally:
            mlflow.pytorch.autolog(disable=True)
            os.environ.pop(JOB_ENV, None)

        mlflow.flush_async_logging()
        step_losses, history = _curves(run.client, run.run_id)
        outcome = record_outcome(
            run, result.model, splits, resolved, tmp, step_losses, history,
            result.train_seconds, result.test_metrics,
        )  # fmt: skip
        summary = summarize(
            run,
            started,
            preset=train_config.preset,
            device=device,
            test_accuracy=outcome.test_accuracy,
            test_macro_f1=outcome.test_macro_f1,
            train_seconds=result.train_seconds,
            model_uri=outcome.models.model_uri,
        )
    return settle(run, summary, register_as, outcome.models.model_id)


def _stop_autolog(trainer: pl.Trainer) -> None:
    """Autolog records training; the test metrics are ours, linked to the served model."""
    callbacks = trainer.callbacks  # type: ignore[attr-defined]
    trainer.callbacks = [c for c in callbacks if not type(c).__module__.startswith("mlflow.")]  # type: ignore[attr-defined]


def _follow(
    data_config: DataConfig,
    train_config: TrainConfig,
    devices: int,
    num_nodes: int,
    resume: str | None,
    callbacks: Sequence[pl.Callback],
) -> None:
    """A non-zero rank: train and test alongside rank 0, and never touch an MLflow store."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    mlflow.set_tracking_uri(NO_STORE)
    checkpoint = None
    if job := os.environ.get(JOB_ENV):
        # Started by rank 0's launcher: the exact config rank 0 resolved.
        spec = json.loads(job)
        train_config = TrainConfig(**spec["train"])
        data_config = dataclasses.replace(data_config, **spec["data"])
        checkpoint = Path(spec["checkpoint"]) if spec["checkpoint"] else None
    elif resume:
        # Started by torchrun or another launcher: rank 0's downloaded checkpoint is not here.
        raise MnistflowError(NO_RESUME_HERE)
    splits = data.load(data_config)
    with tempfile.TemporaryDirectory(prefix="mnistflow-rank-") as tmp:
        lightning.fit(
            train_config,
            splits.train,
            splits.val,
            splits.test,
            Path(tmp),
            devices,
            num_nodes,
            resume_from=checkpoint,
            callbacks=callbacks,
        )


def _resumed(
    run_id: str, tracking: TrackingConfig, data_config: DataConfig, tmp: Path
) -> tuple[TrackingConfig, TrainConfig, DataConfig, Path]:
    """The configs of the run to continue (its own, not the flags') and its last checkpoint."""
    uri = resolve_tracking_uri(tracking.tracking_uri)
    check_reachable(uri)
    client = MlflowClient(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise MnistflowError(f"No run with id {run_id} in {uri}.") from None
    if run.data.tags.get("engine") != "lightning":
        raise MnistflowError(
            f"Run {run_id} was not trained with --engine lightning; only those keep checkpoints "
            "to resume from."
        )
    if run.info.status == "FINISHED":
        raise MnistflowError(f"Run {run_id} has already finished; there is nothing to resume.")
    try:
        config_file = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="config.json", dst_path=str(tmp), tracking_uri=uri
        )
        checkpoint = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=LAST_CHECKPOINT, dst_path=str(tmp), tracking_uri=uri
        )
    except (OSError, MlflowException):
        raise MnistflowError(
            f"Run {run_id} has no {LAST_CHECKPOINT} (it stopped before its first epoch ended); "
            "start a new run instead."
        ) from None
    resolved: dict[str, Any] = json.loads(Path(config_file).read_text())
    experiment = client.get_experiment(run.info.experiment_id).name
    train = TrainConfig(**resolved["train"])
    saved = resolved["data"]
    data_config = dataclasses.replace(
        data_config,
        val_size=saved["val_size"],
        split_seed=saved["split_seed"],
        limit_train=saved["limit_train"],
    )
    tracking = dataclasses.replace(
        tracking, tracking_uri=uri, experiment=experiment, resume_run_id=run_id, run_name=None,
        description=None,
    )  # fmt: skip
    return tracking, train, data_config, Path(checkpoint)


def _curves(client: MlflowClient, run_id: str) -> tuple[list[float], list[dict[str, float]]]:
    """Per-step training loss and per-epoch metrics as the run holds them (a resumed run's
    earlier epochs included), for the learning-curve report."""

    def series(key: str) -> list[float]:
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        return [m.value for m in history]

    keys = {
        "train_loss": "epoch_train_loss",
        "train_accuracy": "epoch_train_accuracy",
        "val_loss": "val_loss",
        "val_accuracy": "val_accuracy",
    }
    columns = {name: series(key) for name, key in keys.items()}
    epochs = min(len(c) for c in columns.values())
    history = [{name: columns[name][i] for name in keys} for i in range(epochs)]
    return series("train_loss"), history
