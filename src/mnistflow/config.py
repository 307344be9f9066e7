"""Typed configuration: one dataclass per concern, defaults in code, presets by name.

Nothing here touches the disk, the network or MLflow; the CLI fills these from flags
and environment variables, and the resolved values are logged whole with every run.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Device = Literal["auto", "cpu", "cuda"]

# The registered model's default name, and its aliases: @champion is served, a new
# version is @challenger until promotion decides.
MODEL_NAME = "mnist"
CHAMPION, CHALLENGER = "champion", "challenger"


class MnistflowError(Exception):
    """An expected failure, told to the user as one sentence (no traceback)."""


@dataclass(frozen=True)
class DataConfig:
    """Where MNIST comes from and how the training set is split."""

    # The four .gz files are verified and kept here; MNISTFLOW_DATA_DIR overrides.
    data_dir: Path = field(
        default_factory=lambda: Path(
            os.environ.get("MNISTFLOW_DATA_DIR") or Path.home() / ".cache" / "mnistflow"
        )
    )
    # A base URL or a local folder holding the four files; None means the public mirrors.
    mirror: str | None = field(default_factory=lambda: os.environ.get("MNISTFLOW_MNIST_MIRROR"))
    val_size: int = 5000
    # Fixed apart from the training seed, so every run validates on the same images.
    split_seed: int = 0
    limit_train: int | None = None


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights."""

    preset: str = "fast"
    arch: str = "fast"
    epochs: int = 2
    batch_size: int = 128
    optimizer: Literal["adam", "adadelta"] = "adam"
    lr: float = 8e-3
    # onecycle: warm up then anneal per step; step: multiply by lr_gamma after each epoch.
    schedule: Literal["onecycle", "step"] = "onecycle"
    lr_gamma: float = 0.7
    weight_decay: float = 0.0
    label_smoothing: float = 0.1
    augment: bool = False
    seed: int = 0
    device: Device = "auto"
    # Per-step metrics are handed to the reporter in blocks of this many steps, so that
    # training never waits on a device sync or a store write for every single step.
    log_every_steps: int = 50


PRESETS: dict[str, TrainConfig] = {
    # A small LeNet-style CNN with a one-cycle Adam schedule: >= 99.0% in two epochs.
    "fast": TrainConfig(),
    # The PyTorch example network and recipe (pytorch/examples mnist/main.py), as a reference.
    "classic": TrainConfig(
        preset="classic",
        arch="classic",
        epochs=14,
        batch_size=64,
        optimizer="adadelta",
        lr=1.0,
        schedule="step",
        lr_gamma=0.7,
        label_smoothing=0.0,
    ),
    # Batch-normalised CNN with random affine augmentation, aimed at >= 99.6%.
    "quality": TrainConfig(
        preset="quality",
        arch="quality",
        epochs=20,
        batch_size=128,
        lr=4e-3,
        weight_decay=5e-4,
        augment=True,
    ),
}


def preset_config(name: str, **overrides: Any) -> TrainConfig:
    """The named preset with the given fields replaced (None means keep the preset's value)."""
    if name not in PRESETS:
        raise MnistflowError(f"Unknown preset {name!r}; choose one of: {', '.join(PRESETS)}.")
    config = dataclasses.replace(
        PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}
    )
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """Refuse values no training could use, naming the field."""
    if config.epochs < 1:
        raise MnistflowError(f"epochs must be at least 1, got {config.epochs}.")
    if config.batch_size < 1:
        raise MnistflowError(f"batch size must be at least 1, got {config.batch_size}.")
    if not config.lr > 0:
        raise MnistflowError(f"learning rate must be positive, got {config.lr}.")
    if config.device not in ("auto", "cpu", "cuda"):
        raise MnistflowError(f"device must be auto, cpu or cuda, got {config.device!r}.")


@dataclass(frozen=True)
class TrackingConfig:
    """Where and how a run is recorded in MLflow."""

    # None: MLFLOW_TRACKING_URI if set, else MLflow's default (sqlite:///mlflow.db here).
    tracking_uri: str | None = None
    experiment: str = "mnist"
    run_name: str | None = None
    # Continue this existing run (the Lightning engine's --resume) instead of starting one.
    run_id: str | None = None
    description: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    async_logging: bool = True
    system_metrics: bool = True
    # Seconds between system-metric samples; MLflow's default of 10 s would miss short runs.
    system_metrics_interval: float = 1.0


def as_dict(config: Any) -> dict[str, Any]:
    """A dataclass as plain JSON-ready values (paths become strings)."""
    return {
        key: str(value) if isinstance(value, Path) else value
        for key, value in dataclasses.asdict(config).items()
    }
