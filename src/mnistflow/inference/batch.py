"""Batch inference: read digits from images, folders, .npy arrays and IDX files, classify
them with a logged model, and write CSV or JSON.

Images go through MNIST-style preprocessing (preprocess.py); arrays and IDX files are taken
as MNIST-format pixels already. An input that cannot be read is reported and skipped; the
rest are still classified.
"""

from __future__ import annotations

import contextlib
import csv
import json
import re
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mnistflow.config import MnistflowError
from mnistflow.data import read_idx
from mnistflow.inference.preprocess import ImageError, image_to_digit
from mnistflow.lifecycle.pixels import PixelError, as_pixels

OUTPUT_SUFFIXES = (".csv", ".json")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class Digits:
    """Digits to classify: where each came from, its pixels, and its label when known."""

    sources: list[str] = field(default_factory=list)
    pixels: list[np.ndarray] = field(default_factory=list)  # each (n, 28, 28) float32
    labels: list[np.ndarray | None] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (source, reason)

    def add(self, sources: list[str], pixels: np.ndarray, labels: np.ndarray | None = None) -> None:
        self.sources += sources
        self.pixels.append(pixels.astype(np.float32, copy=False))
        self.labels.append(labels)

    def __len__(self) -> int:
        return len(self.sources)

    def all_pixels(self) -> np.ndarray:
        return np.concatenate(self.pixels) if self.pixels else np.zeros((0, 28, 28), np.float32)

    def all_labels(self) -> np.ndarray | None:
        """Known labels for every digit, or None unless all are known."""
        if not self.labels or any(lab is None for lab in self.labels):
            return None
        return np.concatenate([lab for lab in self.labels if lab is not None])


def is_idx(path: Path) -> bool:
    return re.search(r"idx\d-ubyte", path.name) is not None


def _as_digit_array(array: np.ndarray, source: str) -> np.ndarray:
    """Any shape as_pixels accepts -> (n, 28, 28) float32, checked as the model checks it."""
    try:
        return as_pixels(array)[:, 0]
    except PixelError as e:
        raise MnistflowError(f"{source}: {e}") from None


def _idx_labels(images: Path) -> np.ndarray | None:
    """Labels that sit beside an MNIST images file (…-images-idx3-ubyte → …-labels-idx1-ubyte)."""
    sibling = images.with_name(images.name.replace("images-idx3", "labels-idx1"))
    if sibling == images or not sibling.is_file():
        return None
    return read_idx(sibling).astype(np.int64)


def collect(paths: Iterable[Path]) -> Digits:
    """Read every input; unreadable images are recorded as failures, not raised."""
    digits = Digits()
    for path in paths:
        if path.is_dir():
            images = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not images:
                raise MnistflowError(
                    f"Folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)})."
                )
            for image in images:
                _add_image(digits, image)
        elif not path.exists():
            raise MnistflowError(f"{path} does not exist.")
        elif path.suffix == ".npy":
            try:
                array = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise MnistflowError(f"{path} is not a readable .npy array ({e}).") from e
            array = _as_digit_array(array, str(path))
            digits.add([f"{path}[{i}]" for i in range(len(array))], array)
        elif is_idx(path):
            array = _as_digit_array(read_idx(path), str(path))
            labels = _idx_labels(path)
            if labels is not None and len(labels) != len(array):
                labels = None
            digits.add([f"{path}[{i}]" for i in range(len(array))], array, labels)
        else:
            _add_image(digits, path)
    return digits


def _add_image(digits: Digits, path: Path) -> None:
    try:
        digits.add([str(path)], image_to_digit(path.read_bytes())[None])
    except (ImageError, OSError) as e:
        digits.failures.append((str(path), str(e)))


def load_classifier(model_uri: str, threads: int = 0) -> tuple[Any, dict[str, str]]:
    """The pyfunc behind model_uri, unwrapped to its classifier, and what it is.

    threads: ONNX Runtime threads per operation (0: all cores; batch work wants them).
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    # Here, not at the top: it imports mlflow, which Spark's workers never need (__init__).
    from mnistflow.lifecycle import registry

    try:
        model = mlflow.pyfunc.load_model(model_uri, model_config={"intra_op_threads": threads})
    except (MlflowException, OSError) as e:
        message = e.message if isinstance(e, MlflowException) else str(e)
        raise MnistflowError(
            f"Cannot load model {model_uri} ({message.splitlines()[0].rstrip('.')}); "
            f"there is: {registry.describe_models(MlflowClient())}."
        ) from None
    classifier = model.unwrap_python_model()
    if not hasattr(classifier, "classify"):
        raise MnistflowError(f"{model_uri} is not an mnistflow classifier (no classify()).")
    return classifier, {"model_uri": model_uri, "model_id": str(model.metadata.model_id)}


def classify(
    classifier: Any,
    pixels: np.ndarray,
    batch_size: int = 1024,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Labels (N,) and probabilities (N, 10) for (N, 28, 28) pixels, a batch at a time."""
    labels, probabilities = [], []
    for start in range(0, len(pixels), batch_size):
        batch = pixels[start : start + batch_size]
        batch_labels, batch_probabilities = classifier.classify(batch)
        labels.append(batch_labels)
        probabilities.append(batch_probabilities)
        if progress:
            progress(len(batch))
    return np.concatenate(labels), np.concatenate(probabilities)


def rows(
    digits: Digits,
    labels: np.ndarray,
    probabilities: np.ndarray,
    abstain_below: float | None = None,
) -> list[dict[str, Any]]:
    """One row per digit: where it came from, its label and that label's probability, and
    for a model logged with an abstain threshold, whether it is not sure (abstain)."""
    known = digits.all_labels()
    out = []
    for i, source in enumerate(digits.sources):
        confidence = float(probabilities[i, labels[i]])
        row: dict[str, Any] = {
            "source": source,
            "label": int(labels[i]),
            "probability": round(confidence, 6),
        }
        if abstain_below is not None:
            row["abstain"] = confidence < abstain_below
        if known is not None:
            row["true_label"] = int(known[i])
        out.append(row)
    return out


def check_output(output: Path | None) -> None:
    """Refuse an output path that cannot be written, before any work: the right suffix, an
    existing folder, and a real trial write there (permission bits say little when run as
    root, or on a read-only file system)."""
    if output is None:
        return
    if output.suffix.lower() not in OUTPUT_SUFFIXES:
        raise MnistflowError(
            f"Cannot write results to {output}: the name must end in .csv or .json."
        )
    folder = output.parent
    if output.is_dir():
        raise MnistflowError(f"Cannot write results to {output}: it is a folder.")
    if not folder.is_dir():
        why = f"{folder} is a file" if folder.exists() else f"the folder {folder} does not exist"
        raise MnistflowError(f"Cannot write results to {output}: {why}.")
    if output.exists():
        try:
            output.open("ab").close()  # opened for appending: its content stays as it is
        except OSError as e:
            raise MnistflowError(f"Cannot write results to {output} ({e.strerror}).") from None
        return
    try:
        tempfile.NamedTemporaryFile(dir=folder).close()  # created and removed at once
    except OSError as e:
        raise MnistflowError(
            f"Cannot write results to {output}: no file can be created in {folder} ({e.strerror})."
        ) from None


def write(results: list[dict[str, Any]], output: Path | None) -> None:
    """Write rows as JSON (when output ends in .json) or CSV; CSV to stdout without output."""
    try:
        _write(results, output)
    except OSError as e:  # e.g. the disk filled up since check_output
        where = output or "standard output"
        raise MnistflowError(f"Cannot write results to {where} ({e.strerror}).") from None


def _write(results: list[dict[str, Any]], output: Path | None) -> None:
    if output is not None and output.suffix.lower() == ".json":
        output.write_text(json.dumps(results, indent=1))
        return
    fields = list(results[0]) if results else ["source", "label", "probability"]
    with output.open("w", newline="") if output else contextlib.nullcontext(sys.stdout) as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(results)
