"""Export a trained network to ONNX, with the softmax inside the graph."""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn


class WithProbabilities(nn.Module):
    """network(pixels) -> probabilities: what the served model answers."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.network(pixels).softmax(dim=1)  # type: ignore[no-any-return]


def to_onnx(model: nn.Module, path: Path) -> Path:
    """Write model (pixels in, logits out) as ONNX: pixels (N,1,28,28) -> probabilities (N,10)."""
    # A CPU copy in the default memory format: the trainer's model stays where it is.
    network = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format).eval()  # type: ignore[call-overload]
    example = torch.zeros(2, 1, 28, 28)
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    # The exporter warns about every torchvision op it could not register, and more.
    onnx_log.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            WithProbabilities(network),
            (example,),
            str(path),
            input_names=["pixels"],
            output_names=["probabilities"],
            dynamic_shapes={"pixels": {0: torch.export.Dim("batch")}},
            dynamo=True,
            external_data=False,  # one self-contained file: the weights are tiny
            verbose=False,
        )
    onnx_log.setLevel(level)
    return path


def onnx_probabilities(path: Path, pixels: np.ndarray) -> np.ndarray:
    """Run an exported model with ONNX Runtime: (N,1,28,28) float32 -> (N,10)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"pixels": pixels.astype(np.float32)})[0]  # type: ignore[no-any-return]
