"""What a study is (SweepDefinition), what one command does with it (SweepConfig), and
what it found (SweepSummary)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from mnistflow.config import (
    MnistflowError,
    TrainConfig,
    preset_config,
)
from mnistflow.sweep.space import SearchSpace, space_from_dict

if TYPE_CHECKING:
    pass

PRUNERS = ("median", "halving", "none")
PrunerName = Literal["median", "halving", "none"]


# -- what a study is and what one command does ----------------------------------------------


@dataclass(frozen=True)
class SweepDefinition:
    """What makes a study's trials comparable: stored in the study, the same for every command
    that joins it."""

    preset: str = "fast"
    epochs: int | None = None  # None: see trial_epochs()
    limit_train: int | None = None
    space: SearchSpace = field(default_factory=SearchSpace)
    pruner: PrunerName = "median"
    # Pruning starts once this many trials have completed (the median needs a few to mean
    # something).
    prune_after_trials: int = 3
    # The training seed, the same for every trial, so that trials differ by their params only.
    seed: int = 0

    def validate(self) -> None:
        base = self.base_config()
        if self.pruner not in PRUNERS:
            raise MnistflowError(
                f"pruner must be one of {', '.join(PRUNERS)}, got {self.pruner!r}."
            )
        if self.limit_train is not None and self.limit_train < 1:
            raise MnistflowError(f"limit_train must be at least 1, got {self.limit_train}.")
        if self.prune_after_trials < 0:
            raise MnistflowError(
                f"prune_after_trials must be 0 or more, got {self.prune_after_trials}."
            )
        if self.space.width is not None and base.arch != "fast":
            raise MnistflowError(
                f"width applies only to the fast network, not to preset {self.preset!r}; remove "
                "it from the search space."
            )
        if not self.space.dimensions():
            raise MnistflowError("The search space is empty; give at least one parameter.")

    def trial_epochs(self) -> int:
        """Epochs per trial: as given, else the preset's, but at least 2 while a pruner is on:
        it decides after an epoch, and after the last one there is nothing left to save (the
        fast preset trains for one)."""
        if self.epochs is not None:
            return self.epochs
        epochs = preset_config(self.preset).epochs
        return max(epochs, 2) if self.pruner != "none" else epochs

    def base_config(self) -> TrainConfig:
        return preset_config(self.preset, epochs=self.trial_epochs(), seed=self.seed)

    def as_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "epochs": self.epochs,
            "limit_train": self.limit_train,
            "space": self.space.as_dict(),
            "pruner": self.pruner,
            "prune_after_trials": self.prune_after_trials,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> SweepDefinition:
        return cls(**{**raw, "space": space_from_dict(raw["space"])})


@dataclass(frozen=True)
class SweepConfig:
    """One sweep command: which study, where it is stored, and how many trials this command
    adds with how many local worker processes."""

    study: str = "mnist-sweep"
    # None: DEFAULT_STORAGE in the working directory. A path is a journal file; a URL
    # (sqlite:///..., postgresql://...) is Optuna's RDB storage.
    storage: str | None = None
    trials: int = 20
    timeout: float | None = None  # seconds for this command's trials to start in
    workers: int = 1
    # None: the study's own definition when it exists, else the defaults.
    definition: SweepDefinition | None = None
    register_as: str | None = None  # register the best trial's model under this name
    sampler_seed: int | None = None  # worker i uses sampler_seed + i

    def validate(self) -> None:
        if not self.study.strip():
            raise MnistflowError("The study name must not be empty.")
        if self.trials < 1:
            raise MnistflowError(f"trials must be at least 1, got {self.trials}.")
        if self.workers < 1:
            raise MnistflowError(f"workers must be at least 1, got {self.workers}.")
        if self.timeout is not None and not self.timeout > 0:
            raise MnistflowError(f"timeout must be positive seconds, got {self.timeout}.")
        if self.definition is not None:
            self.definition.validate()


@dataclass
class SweepSummary:
    """What a sweep command leaves; the CLI prints it, --json prints it as JSON."""

    study: str
    storage: str
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    best_trial: int
    best_params: dict[str, Any]
    best_val_accuracy: float
    best_run_id: str
    best_test_accuracy: float
    best_model_uri: str
    trials_complete: int  # in the whole study, every command's
    trials_pruned: int
    trials_failed: int
    wall_seconds: float  # this command
    registered_model: str | None = None
    registered_version: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
