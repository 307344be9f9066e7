"""Log a trained network as MLflow models, in the active run: the one path every trainer takes.

The contract is at the ONNX level: a graph with input ``pixels`` float32 (N, 1, 28, 28) of
raw 0-255 values and output ``probabilities`` (N, 10). Whatever trained the network (the
plain PyTorch loop, Lightning, scikit-learn) exports such a file and hands it to
``log_served_model`` with its own probabilities on a few digits; the file is checked
against them and logged as the served model, so registry, promotion, inference and
serving never ask who trained it.

Models logged from a PyTorch training run (``log_torch_models``):
  model    a Python-function model (see classifier_model.py) over the ONNX export: raw pixels
           in, label and ten probabilities out. This one is registered and served.
  pytorch  the torch module itself (pt2), for users who want to fine-tune or inspect it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import numpy as np
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, Schema, TensorSpec
from mlflow.types.schema import Array

from mnistflow.config import MnistflowError
from mnistflow.lifecycle import abstention

if TYPE_CHECKING:
    import torch
    from torch import nn

PACKAGE_DIR = Path(__file__).resolve().parent
# How far the ONNX graph's probabilities may stray from the trainer's own.
MAX_ABS_DIFF = 1e-4

PYFUNC_SIGNATURE = ModelSignature(
    inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 28, 28))]),
    outputs=Schema(
        [
            ColSpec(DataType.long, "label"),
            ColSpec(Array(DataType.float), "probabilities"),
            ColSpec(DataType.float, "confidence"),
            ColSpec(DataType.boolean, "abstain"),
        ]
    ),
)
TORCH_SIGNATURE = ModelSignature(
    inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, 28, 28))]),
    outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 10))]),
)


@dataclass(frozen=True)
class LoggedModels:
    model_uri: str  # the pyfunc users call (models:/m-...)
    model_id: str
    pytorch_uri: str
    onnx_max_abs_diff: float  # ONNX vs PyTorch probabilities on the check images


def _pins(*packages: str) -> list[str]:
    # Exact versions of what the model needs, so a serving environment rebuilds the same.
    # A local build suffix (torch's "+cpu") is not on PyPI, so it is dropped.
    return [f"{p}=={version(p).split('+')[0]}" for p in packages]


def _onnx_probabilities(onnx_path: Path, pixels: np.ndarray) -> np.ndarray:
    """Run the graph after checking its interface: pixels (N,1,28,28) -> probabilities (N,10)."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as e:  # ONNX Runtime raises its own classes for missing or invalid files
        raise MnistflowError(f"Cannot load the ONNX model {onnx_path}: {e}") from e
    inputs, outputs = session.get_inputs(), session.get_outputs()
    found = (
        [(i.name, i.type, list(i.shape)[1:]) for i in inputs],
        [o.name for o in outputs],
    )
    if (
        len(inputs) != 1
        or inputs[0].name != "pixels"
        or inputs[0].type != "tensor(float)"
        or list(inputs[0].shape)[1:] != [1, 28, 28]
        or [o.name for o in outputs] != ["probabilities"]
    ):
        raise MnistflowError(
            "The ONNX model must take one input 'pixels' (float, N x 1 x 28 x 28) and give one "
            f"output 'probabilities'; {onnx_path.name} has inputs and outputs {found}."
        )
    probabilities: np.ndarray = session.run(None, {"pixels": pixels})[0]
    return probabilities


def log_served_model(
    onnx_path: Path,
    check_pixels: np.ndarray,
    expected_probabilities: np.ndarray,
    *,
    abstain_below: float,
) -> tuple[str, str, float]:
    """Check an ONNX graph against the trainer's probabilities and log it as the served
    pyfunc ``model`` in the active run; returns (model_uri, model_id, max_abs_diff).

    abstain_below: the confidence under which the model says it is not sure (see
    abstention.py), logged in its model_config.

    check_pixels: (N, 1, 28, 28) raw 0-255 digits (any numeric dtype); the first two are
    the input example. expected_probabilities: (N, 10), the trainer's own answer on them.
    Refuses (MnistflowError) when the labels differ or a probability is off by more than
    MAX_ABS_DIFF.
    """
    pixels = np.asarray(check_pixels)
    if pixels.ndim != 4 or pixels.shape[1:] != (1, 28, 28) or len(pixels) == 0:
        raise MnistflowError(
            f"check_pixels must be shaped (N, 1, 28, 28) with N >= 1; got {pixels.shape}."
        )
    if not (np.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= 255):
        raise MnistflowError("check_pixels must be raw 0-255 values, as the served model takes.")
    pixels = np.ascontiguousarray(pixels, dtype=np.float32)
    if not 0 <= abstain_below <= 1:
        raise MnistflowError(f"abstain_below must be a probability in [0, 1]; got {abstain_below}.")
    expected = np.asarray(expected_probabilities)
    if expected.shape != (len(pixels), 10):
        raise MnistflowError(
            f"expected_probabilities must be shaped ({len(pixels)}, 10); got {expected.shape}."
        )
    got = _onnx_probabilities(onnx_path, pixels)
    if got.shape != expected.shape:
        raise MnistflowError(
            f"The ONNX model answers shape {got.shape} for {len(pixels)} digits, not "
            f"{expected.shape}."
        )
    max_diff = float(np.abs(expected.astype(np.float64) - got).max())
    if not max_diff <= MAX_ABS_DIFF or not np.array_equal(expected.argmax(1), got.argmax(1)):
        raise MnistflowError(
            f"The ONNX export disagrees with the trained model (max probability difference "
            f"{max_diff:.2g}, allowed {MAX_ABS_DIFF:g})."
        )
    logged = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(PACKAGE_DIR / "classifier_model.py"),
        artifacts={"onnx_model": str(onnx_path)},
        # The input check, shared with the server and `predict`, travels with the model.
        code_paths=[str(PACKAGE_DIR / "pixels.py")],
        signature=PYFUNC_SIGNATURE,
        input_example=pixels[:2, 0],  # (2, 28, 28): the documented request shape
        pip_requirements=_pins("mlflow", "onnxruntime", "numpy", "pandas"),
        # Declared so that a loader may override them (batch work asks for all cores).
        model_config={"intra_op_threads": 1, abstention.CONFIG_KEY: float(abstain_below)},
    )
    return str(logged.model_uri), str(logged.model_id), max_diff


def log_torch_models(
    network: nn.Module, check_images: torch.Tensor, workdir: Path, *, abstain_below: float
) -> LoggedModels:
    """Export network to ONNX, log it as the served model, and log the torch module (pt2)
    beside it, in the active run.

    check_images: (N, 1, 28, 28) uint8 digits to confirm the ONNX export agrees with PyTorch
    and to serve as input examples.
    """
    # Imported here: the server and the registry commands never need torch (nor export's).
    import torch

    from mnistflow.lifecycle import export

    network = copy.deepcopy(network).to("cpu", memory_format=torch.contiguous_format).eval()  # type: ignore[call-overload]
    pixels = check_images.float().numpy()  # (N, 1, 28, 28) float32 0-255
    with torch.inference_mode():
        expected = network(torch.from_numpy(pixels)).softmax(1).numpy()
    onnx_path = export.to_onnx(network, workdir / "model.onnx")
    model_uri, model_id, max_diff = log_served_model(
        onnx_path, pixels, expected, abstain_below=abstain_below
    )
    pytorch = mlflow.pytorch.log_model(
        network,
        name="pytorch",
        signature=TORCH_SIGNATURE,
        # Saved as "pt2" (torch.export traces it with this example): a graph, not a pickle,
        # so loading it needs torch but not mnistflow.
        input_example=pixels[:2],
        serialization_format="pt2",
        pip_requirements=_pins("torch", "mlflow", "numpy"),
    )
    return LoggedModels(model_uri, model_id, str(pytorch.model_uri), max_diff)
