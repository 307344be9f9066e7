"""A scikit-learn baseline on the raw pixels, trained with mlflow.sklearn.autolog() active.

The pipeline is min-max scaling, PCA to 50 components and a multinomial logistic
regression: the classic linear baseline for MNIST. It fits in seconds on a CPU (no GPU,
no epochs to tune), reaches about 91% on the test set, and converts to a small ONNX graph,
so it is served by the same pyfunc as the CNN. A baseline that is fast and honest about
what a linear model does is what shows the CNN earns its keep.

Here: the pipeline, its ONNX conversion and autolog around its fit; runs/baseline.py records
the run. One MLflow run (opened by TrackedRun, which autolog logs into) holds:
  autolog's own records  the estimator's params, its training_* metrics, the fitted pipeline
                         as the model `sklearn`, its plots, its training dataset;
  ours                   val/test metrics under the CNN runs' names, tags, description,
                         the three dataset splits, the reports, and the served `model`.
"""

from __future__ import annotations

import contextlib
import importlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mnistflow.config import MnistflowError

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline

PRESET = "baseline"
# Autolog's fitted pipeline; `model` is the served pyfunc in every mnistflow run.
SKLEARN_MODEL_NAME = "sklearn"


@dataclass(frozen=True)
class BaselineConfig:
    """Everything that decides the fitted baseline."""

    pca_components: int = 50
    # Inverse regularisation strength of the logistic regression (scikit-learn's default).
    c: float = 1.0
    max_iter: int = 200
    seed: int = 0  # PCA's randomised SVD

    def validate(self) -> None:
        if not 1 <= self.pca_components <= 784:
            raise MnistflowError(
                f"pca_components must be between 1 and 784, got {self.pca_components}."
            )
        if not self.c > 0:
            raise MnistflowError(f"c must be positive, got {self.c}.")
        if self.max_iter < 1:
            raise MnistflowError(f"max_iter must be at least 1, got {self.max_iter}.")


def build_pipeline(config: BaselineConfig) -> Pipeline:
    """Pixels (N, 784) 0-255 -> min-max scaled -> PCA -> logistic regression."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import MinMaxScaler

    return Pipeline(
        [
            ("scale", MinMaxScaler()),
            ("pca", PCA(n_components=config.pca_components, random_state=config.seed)),
            ("classify", LogisticRegression(C=config.c, max_iter=config.max_iter)),
        ]
    )


def flat(images: np.ndarray) -> np.ndarray:
    """(N, 1, 28, 28) uint8 -> (N, 784) float32, the pixels as the pipeline takes them."""
    return images.reshape(len(images), 784).astype(np.float32)


def to_onnx(pipeline: Pipeline, path: Path) -> Path:
    """Write the fitted pipeline as ONNX with the served contract.

    Input `pixels` float32 (N, 1, 28, 28) 0-255, output `probabilities` (N, 10): a Reshape
    node in front of skl2onnx's graph, and its label output dropped (the pyfunc takes the
    first output and derives the label itself).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LogisticRegression

    graph_model = convert_sklearn(
        pipeline,
        initial_types=[("flat_pixels", FloatTensorType([None, 784]))],
        # Probabilities as a plain (N, 10) tensor, not ZipMap's list of {class: p} maps.
        options={LogisticRegression: {"zipmap": False}},
    )
    graph = graph_model.graph
    graph.initializer.append(numpy_helper.from_array(np.array([-1, 784], np.int64), "flat_shape"))
    # (N, 1, 28, 28) -> (N, 784)
    graph.node.insert(0, helper.make_node("Reshape", ["pixels", "flat_shape"], ["flat_pixels"]))
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 1, 28, 28]))
    outputs = [o for o in graph.output if o.name == "probabilities"]
    if not outputs:
        raise MnistflowError("skl2onnx produced no 'probabilities' output for the baseline.")
    del graph.output[:]
    graph.output.extend(outputs)
    onnx.checker.check_model(graph_model)
    path.write_bytes(graph_model.SerializeToString())
    return path


@dataclass
class AutologTimer:
    """When autolog began logging the fitted model, i.e. when fitting itself ended."""

    fitted_at: float | None = None


@contextlib.contextmanager
def sklearn_autolog(model_name: str = SKLEARN_MODEL_NAME) -> Iterator[AutologTimer]:
    """mlflow.sklearn.autolog() for the duration of the block, its model logged as model_name.

    Autolog logs into the active run (it opens its own only when none is active). Post-
    training metrics are off: our test metrics carry the CNN runs' names instead.
    """
    # The module itself (mlflow.sklearn is a lazy loader to type checkers).
    flavor: Any = importlib.import_module("mlflow.sklearn")
    timer = AutologTimer()
    original = flavor.log_model

    def log_model(*args: Any, **kwargs: Any) -> Any:
        # MLflow 3.17's sklearn autolog hard-codes name="model" and has no option for it;
        # that name is the served pyfunc's in every run (registry looks the model up by it).
        if timer.fitted_at is None:
            timer.fitted_at = time.perf_counter()
        if kwargs.get("name") == "model":
            kwargs["name"] = model_name
        return original(*args, **kwargs)

    flavor.autolog(log_post_training_metrics=False, silent=True)
    # Autolog calls log_model through the module's globals, so this wrapper is what runs.
    flavor.log_model = log_model
    try:
        yield timer
    finally:
        flavor.log_model = original
        # Off again: nothing fitted later in this process (e.g. promotion's metrics) is logged.
        flavor.autolog(disable=True)
