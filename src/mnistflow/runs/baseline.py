"""The scikit-learn baseline's run (engines.sklearn), recorded like a CNN run."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np

from mnistflow import data, reports
from mnistflow.config import DataConfig, TrackingConfig, as_dict
from mnistflow.engines.sklearn import (
    PRESET,
    BaselineConfig,
    build_pipeline,
    flat,
    sklearn_autolog,
    to_onnx,
)
from mnistflow.lifecycle import abstention, logged_models
from mnistflow.recording import (
    TrainSummary,
    ask_registration,
    class_metrics,
    data_record,
    log_test_reports,
    record_inputs,
    settle,
    summarize,
    tracking_record,
    writers_metrics,
)
from mnistflow.tracking import TrackedRun


def baseline_run(
    data_config: DataConfig,
    baseline_config: BaselineConfig,
    tracking_config: TrackingConfig,
    register_as: str | None = None,
) -> TrainSummary:
    """Fit the baseline under autolog and record it as one MLflow run, like a CNN run.

    register_as: then register the served model under this name (it becomes @challenger).
    """
    from sklearn.metrics import accuracy_score, log_loss

    baseline_config.validate()
    started = time.perf_counter()
    splits = data.load(data_config)
    resolved = {
        "train": {"preset": PRESET, "trainer": "scikit-learn", **as_dict(baseline_config)},
        "data": data_record(data_config, splits),
        "tracking": tracking_record(tracking_config),
    }
    description = tracking_config.description or (
        "scikit-learn baseline (min-max scaling, PCA, logistic regression) under "
        "mlflow.sklearn.autolog()."
    )
    tracking_config = dataclasses.replace(tracking_config, description=description)
    x_train, y_train = flat(splits.train.images.numpy()), splits.train.labels.numpy()
    pipeline = build_pipeline(baseline_config)

    with (
        tempfile.TemporaryDirectory(prefix="mnistflow-") as tmp,
        TrackedRun(tracking_config) as run,
    ):
        ask_registration(run, register_as)
        out = Path(tmp)
        record_inputs(
            run, resolved, splits, out,
            preset=PRESET, device="cpu", tags={"trainer": "scikit-learn", **tracking_config.tags},
        )  # fmt: skip

        fit_started = time.perf_counter()
        with sklearn_autolog() as timer:
            pipeline.fit(x_train, y_train)
        fit_ended = time.perf_counter()
        train_seconds = (timer.fitted_at or fit_ended) - fit_started

        val_probabilities = pipeline.predict_proba(flat(splits.val.images.numpy()))
        val_labels = splits.val.labels.numpy()
        test_images = splits.test.images.numpy()
        labels = splits.test.labels.numpy()
        probabilities = pipeline.predict_proba(flat(test_images))  # (N, 10) float64
        predictions = probabilities.argmax(1)
        per_class, per_class_metrics = class_metrics(labels, predictions)
        test_accuracy = float(accuracy_score(labels, predictions))
        final = {
            "val_accuracy": float(accuracy_score(val_labels, val_probabilities.argmax(1))),
            "val_loss": float(log_loss(val_labels, val_probabilities, labels=reports.DIGITS)),
            "test_loss": float(log_loss(labels, probabilities, labels=reports.DIGITS)),
            **per_class_metrics,
            "train_seconds": train_seconds,
            # What autolog spent after fitting: the model, training metrics and plots.
            "autolog_seconds": fit_ended - fit_started - train_seconds,
        }

        nondigits = splits.nondigits
        judged = abstention.measure(
            val_probabilities,
            probabilities,
            labels,
            None if nondigits is None else pipeline.predict_proba(flat(nondigits.numpy())),
        )
        final.update(judged.metrics)
        final.update(writers_metrics(splits, lambda images: pipeline.predict(flat(images.numpy()))))
        check_pixels = test_images[:256].astype(np.float32)  # (256, 1, 28, 28) 0-255
        onnx_path = to_onnx(pipeline, out / "model.onnx")
        model_uri, model_id, max_diff = logged_models.log_served_model(
            onnx_path, check_pixels, probabilities[:256], abstain_below=judged.below
        )
        final["onnx_max_abs_diff"] = max_diff
        run.log_results(test_accuracy, final, model_id)

        log_test_reports(run, test_images, labels, predictions, probabilities, per_class, out)

        summary = summarize(
            run,
            started,
            preset=PRESET,
            device="cpu",
            test_accuracy=test_accuracy,
            test_macro_f1=final["test_macro_f1"],
            train_seconds=train_seconds,
            model_uri=model_uri,
        )
    return settle(run, summary, register_as, model_id)
