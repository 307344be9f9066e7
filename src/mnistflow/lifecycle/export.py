"""Export a trained network to ONNX, with the softmax inside the graph."""

from __future__ import annotations

import copy
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
    # The TorchScript exporter (dynamo=False), not the torch.export one that is torch's
    # default since 2.9: for these small feed-forward networks both write the same graph
    # (probabilities equal to 1e-7, the same ONNX Runtime speed, measured), but torch.export
    # spends about 6 s of every training run tracing and loading its op registry, against
    # 0.25 s. It is deprecated, not removed, in the pinned torch: that warning is known
    # here and would otherwise print on every training run.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            WithProbabilities(network),
            (example,),
            str(path),
            input_names=["pixels"],
            output_names=["probabilities"],
            dynamic_axes={"pixels": {0: "batch"}, "probabilities": {0: "batch"}},
            dynamo=False,
            opset_version=18,
        )
    return path


def onnx_probabilities(path: Path, pixels: np.ndarray) -> np.ndarray:
    """Run an exported model with ONNX Runtime: (N,1,28,28) float32 -> (N,10)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"pixels": pixels.astype(np.float32)})[0]  # type: ignore[no-any-return]
