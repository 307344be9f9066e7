"""Options more than one command takes, defined once (typing.Annotated aliases), and the
choices they offer."""

from __future__ import annotations

from enum import Enum, StrEnum
from typing import Annotated

import typer

from mnistflow.config import PRESETS

Preset = Enum("Preset", {name: name for name in PRESETS}, type=str)  # type: ignore[misc]


class Engine(StrEnum):
    plain = "plain"
    lightning = "lightning"


class PredictEngine(StrEnum):
    local = "local"
    spark = "spark"


class EnvManager(StrEnum):
    local = "local"
    virtualenv = "virtualenv"
    uv = "uv"
    conda = "conda"


class DeviceChoice(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class PrecisionChoice(StrEnum):
    auto = "auto"
    bf16 = "bf16"
    fp32 = "fp32"


def parse_tags(values: list[str] | None) -> dict[str, str]:
    tags = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{item!r} is not KEY=VALUE.", param_hint="--tag")
        tags[key.strip()] = value
    return tags


TrackingUri = Annotated[
    str | None,
    typer.Option(
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db "
        "in the working directory).",
        show_default=False,
    ),
]


ModelName = Annotated[str, typer.Option(help="Registered model name.")]


PresetOption = Annotated[Preset, typer.Option(help="Training recipe.")]  # type: ignore[valid-type]


Epochs = Annotated[
    int | None, typer.Option(min=1, help="Epochs (default: the preset's).", show_default=False)
]


Members = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Networks trained one after another from consecutive seeds and served as one "
        "model that averages their probabilities (default: the preset's).",
        show_default=False,
    ),
]


Seed = Annotated[int, typer.Option(help="Random seed; the same seed on CPU gives the same run.")]


DeviceOption = Annotated[DeviceChoice, typer.Option(help="Where to train.")]


PrecisionOption = Annotated[
    PrecisionChoice | None,
    typer.Option(
        help="Training arithmetic: bf16 mixed precision or fp32 (default: the preset's; auto "
        "takes bf16 where the hardware runs it natively).",
        show_default=False,
    ),
]


LimitTrain = Annotated[
    int | None,
    typer.Option(min=1, help="Train on only the first N training images (fast mode)."),
]


JsonOut = Annotated[
    bool, typer.Option("--json", help="Print the result as one JSON object on the last line.")
]


MinAccuracy = Annotated[
    float, typer.Option(min=0, max=1, help="Absolute floor on the challenger's test accuracy.")
]


MinWritersAccuracy = Annotated[
    float,
    typer.Option(
        min=0,
        max=1,
        help="Floor on the challenger's accuracy on digits by writers outside MNIST "
        "(skipped where the handwriting fonts are not installed).",
    ),
]


Margin = Annotated[
    float,
    typer.Option(min=0, max=1, help="How much worse than the champion the challenger may be."),
]


# What train and baseline record about their run (sweep's differ: they speak of a study).
Experiment = Annotated[str, typer.Option(help="MLflow experiment name.")]
RunName = Annotated[
    str | None, typer.Option(help="Run name (default: MLflow picks one).", show_default=False)
]
Description = Annotated[str | None, typer.Option(help="Run description shown in the MLflow UI.")]
Tags = Annotated[
    list[str] | None, typer.Option(help="Run tag KEY=VALUE; repeatable.", show_default=False)
]
Register = Annotated[
    bool, typer.Option(help="Register the logged model; the new version gets @challenger.")
]
