"""The whole job: train and register, promote by evaluation, classify sample digits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mnistflow import data
from mnistflow.config import (
    MODEL_NAME,
    DataConfig,
    TrackingConfig,
    TrainConfig,
)
from mnistflow.inference import batch
from mnistflow.lifecycle import promotion
from mnistflow.reporting import Reporter
from mnistflow.runs.plain import train_run


def write_sample_digits(test: data.Split, folder: Path, count: int = 10) -> list[int]:
    """Save the first test digits as ordinary PNGs (dark ink on white, 4x larger, as a user's
    scan would be), so predicting them exercises the image path; returns their true labels."""
    from PIL import Image

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
    *,
    min_writers_accuracy: float = promotion.MIN_WRITERS_ACCURACY,
) -> dict[str, Any]:
    """The whole job: train and register, promote by evaluation, classify sample digits."""
    # Loaded (and verified) once, for training, the promotion's evaluation and the samples.
    splits = data.load(data_config)
    summary = train_run(
        data_config, train_config, tracking_config, progress, model_name, splits=splits
    )
    if summary.registered_version is None:
        # The run waits in the spool and its model is not registered yet: promoting now
        # would judge whatever @challenger already is (someone else's, or one refused before).
        return {"train": summary.as_dict(), "promotion": None, "samples": None}
    decision = promotion.promote(
        summary.tracking_uri,
        model_name,
        version=summary.registered_version,
        min_accuracy=min_accuracy,
        min_writers_accuracy=min_writers_accuracy,
        margin=margin,
        test=splits.test,
        writers=splits.writers,
    )
    if decision.champion_version is None:
        # The first model of this name was refused: no champion answers the samples.
        return {"train": summary.as_dict(), "promotion": decision.as_dict(), "samples": None}
    truth = write_sample_digits(splits.test, samples)
    classifier, _ = batch.load_classifier(f"models:/{model_name}@champion")
    digits = batch.collect([samples])
    labels, _ = batch.classify(classifier, digits.all_pixels())
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
