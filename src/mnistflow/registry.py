"""Models in MLflow: log them with a run, register versions, and move the aliases.

Two models are logged from every training run:
  model    a Python-function model (see classifier_model.py) over the ONNX export: raw pixels
           in, label and ten probabilities out. This one is registered and served.
  pytorch  the torch module itself, for users who want to fine-tune or inspect it.

Aliases, never stages: a new version gets @challenger; promotion (promotion.py) moves
@champion; the registered model's tag ``champion_history`` keeps the order of champions so
that rollback can step back.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import numpy as np
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, DataType, Schema, TensorSpec
from mlflow.types.schema import Array

if TYPE_CHECKING:
    import torch
    from torch import nn
# Re-exported: the registry's default name and aliases belong with it.
from mnistflow.config import CHALLENGER as CHALLENGER
from mnistflow.config import CHAMPION as CHAMPION
from mnistflow.config import MODEL_NAME as MODEL_NAME
from mnistflow.config import MnistflowError

HISTORY_TAG = "champion_history"
PACKAGE_DIR = Path(__file__).resolve().parent

PYFUNC_SIGNATURE = ModelSignature(
    inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 28, 28))]),
    outputs=Schema(
        [ColSpec(DataType.long, "label"), ColSpec(Array(DataType.float), "probabilities")]
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


def log_models(network: nn.Module, check_images: torch.Tensor, workdir: Path) -> LoggedModels:
    """Log the pyfunc (ONNX inside) and the torch module to the active run.

    check_images: (N, 1, 28, 28) uint8 digits to confirm the ONNX export agrees with PyTorch
    and to serve as input examples.
    """
    # Imported here: the server and the other registry commands never need torch.
    import torch

    from mnistflow import export

    network = copy.deepcopy(network).to("cpu", memory_format=torch.contiguous_format).eval()  # type: ignore[call-overload]
    pixels = check_images.float().numpy()  # (N, 1, 28, 28) float32 0-255
    onnx_path = export.to_onnx(network, workdir / "model.onnx")
    with torch.inference_mode():
        expected = network(torch.from_numpy(pixels)).softmax(1).numpy()
    got = export.onnx_probabilities(onnx_path, pixels)
    max_diff = float(np.abs(expected - got).max())
    if max_diff > 1e-4 or not np.array_equal(expected.argmax(1), got.argmax(1)):
        raise MnistflowError(
            f"The ONNX export disagrees with PyTorch (max probability difference {max_diff:.2g})."
        )

    pyfunc = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(PACKAGE_DIR / "classifier_model.py"),
        artifacts={"onnx_model": str(onnx_path)},
        # The input check, shared with the server and `predict`, travels with the model.
        code_paths=[str(PACKAGE_DIR / "pixels.py")],
        signature=PYFUNC_SIGNATURE,
        input_example=pixels[:2, 0],  # (2, 28, 28): the documented request shape
        pip_requirements=_pins("mlflow", "onnxruntime", "numpy", "pandas"),
        # Declared so that a loader may override it (batch work asks for all cores).
        model_config={"intra_op_threads": 1},
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
    return LoggedModels(pyfunc.model_uri, pyfunc.model_id, pytorch.model_uri, max_diff)


# -- registry ----------------------------------------------------------------------------


def _run_model_uri(client: MlflowClient, run_id: str) -> str:
    """The pyfunc model logged by a training run."""
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise MnistflowError(f"No run with id {run_id} in {mlflow.get_tracking_uri()}.") from None
    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = 'model'",
    )
    if not models:
        raise MnistflowError(
            f"Run {run_id} has no logged model named 'model'; train it with mnistflow train."
        )
    return f"models:/{models[0].model_id}"


def register(
    run_id: str,
    name: str = MODEL_NAME,
    model_uri: str | None = None,
    client: MlflowClient | None = None,
) -> ModelVersion:
    """Register a training run's model as a new version of name, described and tagged from
    the run, and give it the @challenger alias."""
    client = client or MlflowClient()
    model_uri = model_uri or _run_model_uri(client, run_id)
    run = client.get_run(run_id)
    accuracy = run.data.metrics.get("test_accuracy", float("nan"))
    tags = {
        "test_accuracy": f"{accuracy:.4f}",
        "run_id": run_id,
        "git_commit": run.data.tags.get("git_commit", "unknown"),
        "preset": run.data.tags.get("preset", run.data.params.get("preset", "unknown")),
        "dataset_digest": run.data.tags.get("dataset_digest", "unknown"),
    }
    description = (
        f"{tags['preset']} preset, test accuracy {accuracy:.2%}, trained on "
        f"{run.data.tags.get('device', '?')} in "
        f"{run.data.metrics.get('train_seconds', float('nan')):.1f} s (run {run_id})."
    )
    # MLflow assigns the version number in the store, so concurrent registrations each get
    # their own version; no locking is needed here.
    mv = mlflow.register_model(model_uri, name, tags=tags)
    client.update_model_version(name, mv.version, description=description)
    client.set_registered_model_alias(name, CHALLENGER, mv.version)
    return client.get_model_version(name, mv.version)


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    """The version an alias points at, or None when the alias (or the model) is not set."""
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def describe_models(client: MlflowClient) -> str:
    """What exists, for error messages: 'mnist (versions 1-3; @champion=2)'."""
    parts = []
    for model in client.search_registered_models():
        versions = sorted(
            int(v.version) for v in client.search_model_versions(f"name='{model.name}'")
        )
        aliases = ", ".join(f"@{a}={v}" for a, v in sorted(model.aliases.items()))
        span = f"versions {versions[0]}-{versions[-1]}" if versions else "no versions"
        parts.append(f"{model.name} ({span}{'; ' + aliases if aliases else ''})")
    return "; ".join(parts) or "no registered models"


def champion_history(client: MlflowClient, name: str) -> list[str]:
    tag = client.get_registered_model(name).tags.get(HISTORY_TAG, "")
    return [v for v in tag.split(",") if v]


def make_champion(client: MlflowClient, name: str, version: str, reason: str) -> None:
    """Point @champion at version and append it to the champion history."""
    history = champion_history(client, name)
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_registered_model_tag(name, HISTORY_TAG, ",".join([*history, version]))
    client.set_model_version_tag(name, version, "promoted_at", time.strftime("%Y-%m-%dT%H:%M:%S"))
    client.set_model_version_tag(name, version, "promotion_reason", reason)


def rollback(client: MlflowClient, name: str = MODEL_NAME) -> tuple[str, str]:
    """Move @champion back to the previous champion; returns (from_version, to_version)."""
    try:
        history = champion_history(client, name)
    except MlflowException:
        raise MnistflowError(
            f"No registered model {name!r}; there is: {describe_models(client)}."
        ) from None
    if len(history) < 2:
        raise MnistflowError(
            f"{name} has no earlier champion to roll back to (champion history: "
            f"{', '.join(history) or 'empty'})."
        )
    current, previous = history[-1], history[-2]
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.set_registered_model_tag(name, HISTORY_TAG, ",".join(history[:-1]))
    client.set_model_version_tag(
        name, current, "rolled_back_at", time.strftime("%Y-%m-%dT%H:%M:%S")
    )
    return current, previous
