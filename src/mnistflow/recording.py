"""What every training run records, whoever trains: the resolved config, tags and dataset
lineage before training; test metrics, the logged models, reports and weights after; the
summary the CLI prints, and where the run landed (its store, or the local spool) once it
ended."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mnistflow import data, reports
from mnistflow.config import (
    DataConfig,
    TrackingConfig,
    TrainConfig,
    as_dict,
)
from mnistflow.engines.plain import Evaluation, evaluate, outputs
from mnistflow.lifecycle import abstention, logged_models, registry
from mnistflow.store.uris import redact
from mnistflow.tracking import TrackedRun

# Test digits the ONNX export is checked on (against PyTorch) and logged as input examples.
CHECK_IMAGES = 256


@dataclass
class TrainSummary:
    """What a tracked training run produced; the CLI prints it, --json prints it as JSON."""

    run_id: str
    experiment_id: str
    tracking_uri: str
    artifact_uri: str
    preset: str
    device: str
    test_accuracy: float
    test_macro_f1: float
    # Pure training time (the training loops only); total_seconds is the whole command.
    train_seconds: float
    total_seconds: float
    model_uri: str  # the logged pyfunc
    registered_model: str | None = None
    registered_version: str | None = None
    # True when the run is kept in the local spool for `mnistflow sync` (server away), and why.
    spooled: bool = False
    spool_reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def summarize(
    run: TrackedRun,
    started: float,
    *,
    preset: str,
    device: str,
    test_accuracy: float,
    test_macro_f1: float,
    train_seconds: float,
    model_uri: str,
) -> TrainSummary:
    """The run's summary; the whole command's time since `started` (a perf_counter reading)
    is logged as total_seconds."""
    total = time.perf_counter() - started
    run.log_metrics({"total_seconds": total})
    return TrainSummary(
        run_id=run.run_id,
        experiment_id=run.experiment_id,
        tracking_uri=run.tracking_uri,
        artifact_uri=run.artifact_uri,
        preset=preset,
        device=device,
        test_accuracy=test_accuracy,
        test_macro_f1=test_macro_f1,
        train_seconds=train_seconds,
        total_seconds=total,
        model_uri=model_uri,
    )


def ask_registration(run: TrackedRun, register_as: str | None) -> None:
    """While the run is open: a spooled run registers on the server once it is copied."""
    if run.spooled and register_as:
        run.spooled.register_as(register_as)


def settle(
    run: TrackedRun, summary: TrainSummary, register_as: str | None, model_id: str
) -> TrainSummary:
    """After the run has ended: where it landed (the server, or the spool) and the version
    register_as asked for (of the served model model_id)."""
    if run.spooled:
        # The server has the run only once the spool's copy is through (see spool/).
        copied = run.sync_result
        summary.tracking_uri = run.tracking_uri
        summary.spooled = not (copied and copied.complete)
        summary.spool_reason = copied.error if copied and summary.spooled else None
        if copied and copied.complete and copied.remote_run_id:
            # What the user asked for: the server's run, artifacts and model.
            summary.run_id = copied.remote_run_id
            remote = registry.client_for(run.tracking_uri).get_run(copied.remote_run_id)
            summary.experiment_id = remote.info.experiment_id
            summary.artifact_uri = remote.info.artifact_uri
            served = copied.models.get(summary.model_uri.removeprefix("models:/"))
            summary.model_uri = f"models:/{served}" if served else summary.model_uri
        elif copied and copied.remote_run_id:
            summary.run_id = copied.remote_run_id
        if register_as and copied and copied.registered_version:
            summary.registered_model = register_as
            summary.registered_version = copied.registered_version
    elif register_as:
        # After the run has ended: a version points at a finished run.
        client = registry.client_for(summary.tracking_uri)
        version = registry.register(client, summary.run_id, register_as, model_id)
        summary.registered_model, summary.registered_version = register_as, str(version.version)
    return summary


# -- the stages of a run -------------------------------------------------------------


def resolved_config(
    data_config: DataConfig,
    train_config: TrainConfig,
    tracking_config: TrackingConfig,
    splits: data.MnistSplits,
) -> dict[str, Any]:
    """Every value the run was made with, as logged (params and config.json)."""
    return {
        "train": as_dict(train_config),
        "data": data_record(data_config, splits),
        "tracking": tracking_record(tracking_config),
    }


def tracking_record(tracking_config: TrackingConfig) -> dict[str, Any]:
    """The tracking part of a run's resolved config, whatever trains: config.json and the
    checkpoint are readable by every account with READ, so the URI is kept without its
    password."""
    record = as_dict(tracking_config)
    if record["tracking_uri"]:
        record["tracking_uri"] = redact(record["tracking_uri"])
    return record


def data_record(data_config: DataConfig, splits: data.MnistSplits) -> dict[str, Any]:
    """The data part of a run's resolved config, whatever trains (logged as data.*)."""
    return {
        **as_dict(data_config),
        "source": splits.source,
        "train_size": len(splits.train),
        "val_size": len(splits.val),
        "test_size": len(splits.test),
        # Non-digits the abstain flag was measured on (0: none, no nondigit_* metrics).
        "nondigits_size": 0 if splits.nondigits is None else len(splits.nondigits),
        # Other writers' digits (0: no handwriting font installed, no writers_accuracy).
        "writers_size": 0 if splits.writers is None else len(splits.writers),
        "writers_digest": None if splits.writers is None else splits.writers.digest,
    }


def record_inputs(
    run: TrackedRun,
    resolved: dict[str, Any],
    splits: data.MnistSplits,
    workdir: Path,
    *,
    preset: str,
    device: str,
    tags: Mapping[str, str],
) -> None:
    """Config, tags and dataset lineage, before any training (every trainer, sweep trials
    included)."""
    config_file = workdir / "config.json"
    config_file.write_text(json.dumps(resolved, indent=2, default=str))
    # First artifact before any training: an unwritable artifact store fails here, fast.
    run.log_config(resolved, config_file)
    run.set_tags(preset, device, dict(tags))
    run.log_datasets(splits)


def class_metrics(
    labels: np.ndarray, predictions: np.ndarray
) -> tuple[dict[str, Any], dict[str, float]]:
    """The per-class report of the test predictions, and what is logged from it: macro F1
    and the accuracy on each digit."""
    per_class = reports.per_class(labels, predictions)
    metrics = {
        "test_macro_f1": per_class["macro avg"]["f1-score"],
        **{f"test_accuracy_digit_{d}": per_class[str(d)]["accuracy"] for d in reports.DIGITS},
    }
    return per_class, metrics


def log_test_reports(
    run: TrackedRun,
    images: np.ndarray,
    labels: np.ndarray,
    predictions: np.ndarray,
    probabilities: np.ndarray,
    per_class: dict[str, Any],
    workdir: Path,
    curves: tuple[Sequence[float], Sequence[Mapping[str, float]]] | None = None,
) -> None:
    """reports/: the per-class table, the confusion matrix, the misclassified digits, and
    the learning curves (step losses, epoch history) where there are some."""
    folder = workdir / "reports"
    folder.mkdir()
    reports.write_per_class(per_class, folder)
    reports.confusion_matrix_png(labels, predictions, folder / "confusion_matrix.png")
    reports.misclassified_png(
        images, labels, predictions, probabilities, folder / "misclassified.png"
    )
    if curves is not None:
        reports.learning_curves_png(*curves, folder / "learning_curves.png")
    run.log_folder(folder, "reports")


@dataclass
class Outcome:
    """What record_outcome logged: the headline test metrics and the logged models."""

    test_accuracy: float
    test_macro_f1: float
    models: logged_models.LoggedModels


def record_outcome(
    run: TrackedRun,
    model: nn.Module,
    splits: data.MnistSplits,
    resolved: dict[str, Any],
    workdir: Path,
    step_losses: Sequence[float],
    history: Sequence[Mapping[str, float]],
    train_seconds: float,
    test_metrics: Mapping[str, float] | None = None,
) -> Outcome:
    """After training, whatever trained the network: test metrics, the models, the reports
    and the weights, all into the active run.

    test_metrics: test_accuracy and test_loss already computed elsewhere (the Lightning
    engine's, reduced over all processes); else they come from evaluating model here.
    """
    test = evaluate(model, splits.test)
    accuracy = test_metrics["test_accuracy"] if test_metrics else test.accuracy
    judged = judge(model, splits, test)
    logged = logged_models.log_torch_models(
        model, splits.test.images[:CHECK_IMAGES], workdir, abstain_below=judged.below
    )
    labels, predictions = splits.test.labels.numpy(), test.predictions.numpy()
    per_class, per_class_metrics = class_metrics(labels, predictions)
    final = {
        "test_loss": test_metrics["test_loss"] if test_metrics else test.loss,
        **per_class_metrics,
        **judged.metrics,
        "train_seconds": train_seconds,
        "onnx_max_abs_diff": logged.onnx_max_abs_diff,
        **member_temperatures(model),
    }
    run.log_results(accuracy, final, logged.model_id)
    log_test_reports(
        run,
        splits.test.images.numpy(),
        labels,
        predictions,
        test.probabilities.numpy().astype(np.float64),
        per_class,
        workdir,
        curves=(step_losses, history),
    )
    _log_weights(run, resolved, model, workdir)
    return Outcome(accuracy, final["test_macro_f1"], logged)


def member_temperatures(model: nn.Module) -> dict[str, float]:
    """An ensemble's member_K_temperature, each fitted on the validation digits (see
    networks.Ensemble); nothing for a single network."""
    temperatures = getattr(model, "temperatures", None)
    if temperatures is None:
        return {}
    return {f"member_{k}_temperature": float(t) for k, t in enumerate(temperatures)}


def judge(model: nn.Module, splits: data.MnistSplits, test: Evaluation) -> abstention.Abstention:
    """A trained network beyond the test set: its abstain threshold, chosen on the
    validation digits, what it does on the test digits and the non-digits (see
    lifecycle/abstention.py), and its accuracy on other writers' digits; all in .metrics."""
    val = outputs(model, splits.val.images).softmax(1).numpy()
    nondigits = None if splits.nondigits is None else outputs(model, splits.nondigits)
    judged = abstention.measure(
        val,
        test.probabilities.numpy(),
        splits.test.labels.numpy(),
        None if nondigits is None else nondigits.softmax(1).numpy(),
    )
    judged.metrics.update(
        writers_metrics(splits, lambda images: outputs(model, images).argmax(1).numpy())
    )
    return judged


def writers_metrics(
    splits: data.MnistSplits, predict: Callable[[torch.Tensor], np.ndarray]
) -> dict[str, float]:
    """writers_accuracy: predict's labels on the other-writers digits (data/writers.py)
    against theirs; nothing where that set is not installed."""
    if splits.writers is None:
        return {}
    right = predict(splits.writers.images) == splits.writers.labels.numpy()
    return {"writers_accuracy": float(right.mean())}


def _log_weights(
    run: TrackedRun, resolved: dict[str, Any], model: nn.Module, workdir: Path
) -> None:
    """The checkpoint, with what is needed to rebuild the network around the weights."""
    weights = workdir / "model.pt"
    torch.save(
        {
            "arch": resolved["train"]["arch"],
            "members": resolved["train"]["members"],  # networks.build(arch, members)
            "config": resolved,
            "state_dict": model.state_dict(),
        },
        weights,
    )
    run.log_file(weights, "weights")
