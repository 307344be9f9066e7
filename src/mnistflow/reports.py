"""Plots and reports that let a teammate judge a run without rerunning it.

Each function writes one file into a folder; the tracking module uploads the folder.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

DIGITS = list(range(10))


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def per_class(labels: np.ndarray, predictions: np.ndarray) -> dict[str, Any]:
    """Precision, recall, F1, support and accuracy per digit, plus the overall figures."""
    from sklearn.metrics import classification_report

    report: dict[str, Any] = classification_report(
        labels, predictions, labels=DIGITS, output_dict=True, zero_division=0
    )
    for digit in DIGITS:
        # A digit's accuracy is the share of its images classified as it: its recall.
        report[str(digit)]["accuracy"] = report[str(digit)]["recall"]
    return report


def write_per_class(report: Mapping[str, Any], folder: Path) -> list[Path]:
    json_path, csv_path = folder / "per_class.json", folder / "per_class.csv"
    json_path.write_text(json.dumps(report, indent=2))
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["digit", "precision", "recall", "f1", "accuracy", "support"])
        for digit in DIGITS:
            row = report[str(digit)]
            writer.writerow(
                [digit]
                + [f"{row[k]:.4f}" for k in ("precision", "recall", "f1-score", "accuracy")]
                + [int(row["support"])]
            )
    return [json_path, csv_path]


def confusion_matrix_png(labels: np.ndarray, predictions: np.ndarray, path: Path) -> Path:
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 6))
    ConfusionMatrixDisplay.from_predictions(
        labels, predictions, labels=DIGITS, ax=ax, colorbar=False, cmap="Blues"
    )
    accuracy = float((labels == predictions).mean())
    ax.set_title(f"Confusion matrix, test set (accuracy {accuracy:.2%})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def misclassified_png(
    images: np.ndarray,
    labels: np.ndarray,
    predictions: np.ndarray,
    probabilities: np.ndarray,
    path: Path,
    limit: int = 64,
) -> Path:
    """A grid of wrongly classified digits, most confident mistakes first."""
    plt = _pyplot()
    wrong = np.flatnonzero(labels != predictions)
    confidence = probabilities[wrong, predictions[wrong]]
    wrong = wrong[np.argsort(-confidence)][:limit]
    # One image of all the digits, captions as text on it: a grid of 64 axes took seconds
    # of every run to lay out and draw.
    cols, cell, gap, pad = 8, 28, 4, 18  # pad: room above each digit for its two-line caption
    rows = max(1, -(-len(wrong) // cols))
    mosaic = np.full((rows * (cell + pad) + gap, cols * (cell + gap)), 255.0)
    width, height = mosaic.shape[1] / 30, mosaic.shape[0] / 30  # inches: 30 mosaic pixels each
    fig = plt.figure(figsize=(width, height + 0.4))
    ax = fig.add_axes((0.0, 0.0, 1.0, height / (height + 0.4)))
    ax.axis("off")
    for k, i in enumerate(wrong):
        top, left = (k // cols) * (cell + pad) + pad, (k % cols) * (cell + gap) + gap // 2
        mosaic[top : top + cell, left : left + cell] = images[i].reshape(28, 28)
        ax.text(
            left + cell / 2,
            top - 1.5,
            f"true {labels[i]} pred {predictions[i]}\n{probabilities[i, predictions[i]]:.0%}",
            fontsize=7,
            ha="center",
            va="bottom",
        )
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    fig.suptitle(f"{int((labels != predictions).sum())} misclassified test digits", fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def learning_curves_png(
    step_losses: Sequence[float], history: Sequence[Mapping[str, float]], path: Path
) -> Path:
    """Training loss per step; train and validation loss and accuracy per epoch."""
    plt = _pyplot()
    fig, (ax_step, ax_loss, ax_acc) = plt.subplots(1, 3, figsize=(14, 4))
    ax_step.plot(np.arange(len(step_losses)), step_losses, lw=0.6, alpha=0.5, label="per step")
    window = max(1, len(step_losses) // 50)
    if len(step_losses) >= window:
        smooth = np.convolve(step_losses, np.ones(window) / window, mode="valid")
        ax_step.plot(np.arange(window - 1, len(step_losses)), smooth, label=f"mean of {window}")
    ax_step.set(title="Training loss", xlabel="step", yscale="log")
    ax_step.legend()
    epochs = np.arange(1, len(history) + 1)
    for key in ("train_loss", "val_loss"):
        ax_loss.plot(epochs, [h[key] for h in history], marker="o", label=key)
    ax_loss.set(title="Loss per epoch", xlabel="epoch")
    ax_loss.legend()
    for key in ("train_accuracy", "val_accuracy"):
        ax_acc.plot(epochs, [h[key] for h in history], marker="o", label=key)
    ax_acc.set(title="Accuracy per epoch", xlabel="epoch")
    ax_acc.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
