"""The lifecycle stages put together: a tracked training run, and the whole job end to end."""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mnistflow import data, registry, reports
from mnistflow.config import MODEL_NAME, DataConfig, TrackingConfig, TrainConfig, as_dict
from mnistflow.reporting import Reporter, Tee
from mnistflow.tracking import TrackedRun
from mnistflow.train import evaluate, fit, resolve_device


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
    model_uri: str  # the logged pyfunc model
    registered_model: str | None = None
    registered_version: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def train_run(
    data_config: DataConfig,
    train_config: TrainConfig,
    tracking_config: TrackingConfig,
    progress: Reporter | None = None,
    register_as: str | None = None,
) -> TrainSummary:
    """Load MNIST, train, evaluate on the test set, and record all of it (the models too)
    as one MLflow run.

    register_as: then register the pyfunc under this name (it becomes @challenger).
    """
    started = time.perf_counter()
    splits = data.load(data_config)
    # The resolved device ("cpu" or "cuda", never "auto") is what gets logged.
    device = resolve_device(train_config.device).type
    train_config = dataclasses.replace(train_config, device=device)  # type: ignore[arg-type]
    resolved = {
        "train": as_dict(train_config),
        "data": {
            **as_dict(data_config),
            "source": splits.source,
            "train_size": len(splits.train),
            "val_size": len(splits.val),
            "test_size": len(splits.test),
        },
        "tracking": as_dict(tracking_config),
    }

    with (
        tempfile.TemporaryDirectory(prefix="mnistflow-") as tmp,
        TrackedRun(tracking_config) as run,
    ):
        out = Path(tmp)
        config_file = out / "config.json"
        config_file.write_text(json.dumps(resolved, indent=2, default=str))
        # First artifact before any training: an unwritable artifact store fails here, fast.
        run.log_config(resolved, config_file)
        run.set_tags(train_config.preset, train_config.device, tracking_config.tags)
        run.log_datasets(splits)

        result = fit(
            train_config,
            splits.train,
            splits.val,
            Tee(run, progress) if progress else run,
        )

        logged = record_outcome(
            run, result.model, splits, resolved, out, result.step_losses, result.history,
            result.train_seconds,
        )  # fmt: skip

        total = time.perf_counter() - started
        run.log_metrics({"total_seconds": total})
        summary = TrainSummary(
            run_id=run.run_id,
            experiment_id=run.experiment_id,
            tracking_uri=run.tracking_uri,
            artifact_uri=run.artifact_uri,
            preset=train_config.preset,
            device=train_config.device,
            test_accuracy=logged.test_accuracy,
            test_macro_f1=logged.test_macro_f1,
            train_seconds=result.train_seconds,
            total_seconds=total,
            model_uri=logged.models.model_uri,
        )
    if register_as:
        # After the run has ended: a version points at a finished run.
        version = registry.register(summary.run_id, register_as, summary.model_uri)
        summary.registered_model, summary.registered_version = register_as, str(version.version)
    return summary


@dataclass
class Outcome:
    """What record_outcome logged: the headline test metrics and the logged models."""

    test_accuracy: float
    test_macro_f1: float
    models: registry.LoggedModels


def record_outcome(
    run: TrackedRun,
    model: torch.nn.Module,
    splits: data.MnistSplits,
    resolved: dict[str, Any],
    out: Path,
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
    labels = splits.test.labels.numpy()
    predictions = test.predictions.numpy()
    per_class = reports.per_class(labels, predictions)
    final = {
        "test_loss": test_metrics["test_loss"] if test_metrics else test.loss,
        "test_macro_f1": per_class["macro avg"]["f1-score"],
        **{f"test_accuracy_digit_{d}": per_class[str(d)]["accuracy"] for d in reports.DIGITS},
        "train_seconds": train_seconds,
    }
    logged = registry.log_models(model, splits.test.images[:256], out)
    final["onnx_max_abs_diff"] = logged.onnx_max_abs_diff
    run.log_results(accuracy, final, logged.model_id)

    report_dir = out / "reports"
    report_dir.mkdir()
    reports.write_per_class(per_class, report_dir)
    reports.confusion_matrix_png(labels, predictions, report_dir / "confusion_matrix.png")
    reports.misclassified_png(
        splits.test.images.numpy(),
        labels,
        predictions,
        test.probabilities.numpy().astype(np.float64),
        report_dir / "misclassified.png",
    )
    reports.learning_curves_png(step_losses, history, report_dir / "learning_curves.png")
    run.log_folder(report_dir, "reports")

    # The checkpoint carries what is needed to rebuild the network around the weights.
    weights = out / "model.pt"
    torch.save(
        {"arch": resolved["train"]["arch"], "config": resolved, "state_dict": model.state_dict()},
        weights,
    )
    run.log_file(weights, "weights")
    return Outcome(accuracy, final["test_macro_f1"], logged)


def write_sample_digits(data_config: DataConfig, folder: Path, count: int = 10) -> list[int]:
    """Save the first test digits as ordinary PNGs (dark ink on white, 4x larger, as a user's
    scan would be), so predicting them exercises the image path; returns their true labels."""
    from PIL import Image

    test = data.load(data_config).test
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        digit = 255 - test.images[i, 0].numpy()
        Image.fromarray(digit).resize((112, 112), Image.Resampling.BICUBIC).save(
            folder / f"test-{i:02d}.png"
        )
    return [int(x) for x in test.labels[:count]]


def run_pipeline(
    data_config: DataConfig,
    train_config: TrainConfig,
    tracking_config: TrackingConfig,
    model_name: str = MODEL_NAME,
    min_accuracy: float = 0.99,
    margin: float = 0.002,
    samples: Path = Path("sample-digits"),
    progress: Reporter | None = None,
) -> dict[str, Any]:
    """The whole job: train and register, promote by evaluation, classify sample digits."""
    from mnistflow import inference, promotion

    summary = train_run(
        data_config, train_config, tracking_config, progress, register_as=model_name
    )
    decision = promotion.promote(
        model_name, summary.registered_version, min_accuracy, margin, data_config
    )
    truth = write_sample_digits(data_config, samples)
    classifier, _ = inference.load_classifier(f"models:/{model_name}@champion")
    digits = inference.collect([samples])
    labels, _ = inference.classify(classifier, digits.all_pixels())
    return {
        "train": summary.as_dict(),
        "promotion": decision.as_dict(),
        "samples": {
            "folder": str(samples),
            "true": truth,
            "predicted": [int(x) for x in labels],
            "correct": int(sum(t == p for t, p in zip(truth, labels, strict=True))),
        },
    }
