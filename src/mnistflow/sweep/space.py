"""The search space: ranges and choices over TrainConfig fields, from YAML or a dict."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mnistflow.config import (
    MnistflowError,
)

if TYPE_CHECKING:
    import optuna


# -- the search space ---------------------------------------------------------------------


@dataclass(frozen=True)
class Range:
    """A continuous (or, for integer parameters, integer) range; log samples log-uniformly."""

    low: float
    high: float
    log: bool = False


@dataclass(frozen=True)
class Choice:
    """A categorical choice among values."""

    values: tuple[float, ...]


Dimension = Range | Choice
INT_PARAMS = ("batch_size", "width")


@dataclass(frozen=True)
class SearchSpace:
    """What each trial draws; a parameter set to None is not searched (the preset's value)."""

    lr: Dimension | None = Range(1e-3, 3e-2, log=True)
    batch_size: Dimension | None = Choice((64, 128, 256))
    weight_decay: Dimension | None = Range(1e-6, 1e-2, log=True)
    label_smoothing: Dimension | None = Range(0.0, 0.2)
    # The fast network's first-layer channels (24, networks.FAST_WIDTH, is the preset's).
    width: Dimension | None = Choice((16, 24, 32))

    def dimensions(self) -> dict[str, Dimension]:
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        }

    def describe(self) -> dict[str, str]:
        """One readable line per searched parameter, e.g. 'log-uniform [0.001, 0.03]'."""
        lines = {}
        for name, dim in self.dimensions().items():
            if isinstance(dim, Choice):
                lines[name] = "one of " + ", ".join(str(v) for v in dim.values)
            else:
                kind = "log-uniform" if dim.log else "uniform"
                kind = ("integer " if name in INT_PARAMS else "") + kind
                lines[name] = f"{kind} [{dim.low:g}, {dim.high:g}]"
        return lines

    def as_dict(self) -> dict[str, Any]:
        """The YAML/JSON form that space_from_dict reads."""
        return {
            name: list(dim.values)
            if isinstance(dim, Choice)
            else {"low": dim.low, "high": dim.high, "log": dim.log}
            for name, dim in self.dimensions().items()
        }

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Draw every searched parameter from the trial."""
        params: dict[str, Any] = {}
        for name, dim in self.dimensions().items():
            if isinstance(dim, Choice):
                params[name] = trial.suggest_categorical(name, list(dim.values))
            elif name in INT_PARAMS:
                params[name] = trial.suggest_int(name, int(dim.low), int(dim.high), log=dim.log)
            else:
                params[name] = trial.suggest_float(name, dim.low, dim.high, log=dim.log)
        return params


def _number(value: Any, where: str) -> float:
    # PyYAML reads 1e-3 (no dot) as a string: accept any text that is a number.
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise MnistflowError(f"{where} must be a number, got {value!r}.")
    try:
        number = float(value)
    except ValueError:
        raise MnistflowError(f"{where} must be a number, got {value!r}.") from None
    if not math.isfinite(number):
        raise MnistflowError(f"{where} must be a finite number, got {value!r}.")
    return number


def _dimension(name: str, raw: Any, source: str) -> Dimension:
    where = f"{name} in {source}"
    if isinstance(raw, list):
        if not raw:
            raise MnistflowError(f"{where} is an empty list; give at least one value.")
        values = tuple(_number(v, f"every value of {where}") for v in raw)
        if name in INT_PARAMS:
            if any(v != int(v) for v in values):
                raise MnistflowError(f"{where} must list whole numbers, got {raw}.")
            values = tuple(int(v) for v in values)
        return Choice(values)
    if isinstance(raw, dict):
        unknown = set(raw) - {"low", "high", "log"}
        if unknown or not {"low", "high"} <= set(raw):
            raise MnistflowError(
                f"{where} must be a list of values or a mapping with low, high and optionally "
                f"log, got keys {', '.join(map(str, raw)) or 'none'}."
            )
        low, high = _number(raw["low"], f"low of {where}"), _number(raw["high"], f"high of {where}")
        log = raw.get("log", False)
        if not isinstance(log, bool):
            raise MnistflowError(f"log of {where} must be true or false, got {log!r}.")
        if not low < high:
            raise MnistflowError(f"{where} needs low < high, got low={low:g}, high={high:g}.")
        if log and low <= 0:
            raise MnistflowError(f"{where} is log-uniform, so low must be positive, got {low:g}.")
        if name in INT_PARAMS and (low != int(low) or high != int(high)):
            raise MnistflowError(f"{where} needs whole-number bounds, got {low:g}..{high:g}.")
        return Range(low, high, log)
    raise MnistflowError(
        f"{where} must be a list of values or a mapping with low and high, got {raw!r}."
    )


def space_from_dict(raw: Any, source: str = "the search space") -> SearchSpace:
    """A SearchSpace from its YAML/JSON form; parameters it does not name are not searched."""
    if not isinstance(raw, dict):
        raise MnistflowError(
            f"{source} must map parameter names to a list of values or a low/high range."
        )
    names = [f.name for f in dataclasses.fields(SearchSpace)]
    unknown = [str(k) for k in raw if k not in names]
    if unknown:
        raise MnistflowError(
            f"Unknown parameter {unknown[0]!r} in {source}; choose from: {', '.join(names)}."
        )
    if not raw:
        raise MnistflowError(f"{source} is empty; give at least one parameter to search.")
    space = SearchSpace(**{name: _dimension(name, raw.get(name), source) if name in raw else None
                           for name in names})  # fmt: skip
    _check_values(space, source)
    return space


def _check_values(space: SearchSpace, source: str) -> None:
    """Refuse values no training could use (the bounds of ranges, every listed choice)."""
    floors = {
        "lr": (0.0, False),
        "batch_size": (1.0, True),
        "weight_decay": (0.0, True),
        "label_smoothing": (0.0, True),
        "width": (1.0, True),
    }
    for name, dim in space.dimensions().items():
        values = dim.values if isinstance(dim, Choice) else (dim.low, dim.high)
        floor, inclusive = floors[name]
        for v in values:
            if v < floor or (v == floor and not inclusive):
                bound = "at least" if inclusive else "above"
                raise MnistflowError(f"{name} in {source} must be {bound} {floor:g}, got {v:g}.")
            if name == "label_smoothing" and v >= 1:
                raise MnistflowError(f"label_smoothing in {source} must be below 1, got {v:g}.")


def load_space(path: Path) -> SearchSpace:
    """Read a search space from a YAML file (see SearchSpace.as_dict for the form)."""
    import yaml  # a dependency of MLflow

    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise MnistflowError(f"Cannot read the search space file {path}: {e.strerror}.") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise MnistflowError(f"The search space file {path} is not valid YAML{at}.") from None
    return space_from_dict(raw, str(path))
