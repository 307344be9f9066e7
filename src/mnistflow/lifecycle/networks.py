"""The networks, by architecture name. Each takes raw pixels and returns logits.

Input: (B, 1, 28, 28) float pixel values 0-255 (white digit on black, as in MNIST).
Output: (B, 10) logits. Scaling lives inside the network, so the trained module, its ONNX
export and the served model cannot disagree about preprocessing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

# Mean and standard deviation of the MNIST training pixels, on the 0-1 scale.
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


class Standardize(nn.Module):
    """0-255 pixels -> zero mean, unit variance, with MNIST's training statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - 255 * MNIST_MEAN) / (255 * MNIST_STD)


# The fast preset's network width: 24 reaches 99.1-99.3% in one epoch (16 only about 99.0%;
# measured over seeds, README).
FAST_WIDTH = 24


class ChannelsLastFlatten(nn.Module):
    """Flattens (B, C, H, W) in the order (H, W, C): a free view of a channels_last tensor,
    where nn.Flatten's (C, H, W) order copies it, and copies its gradient back, every step
    (measured with torch.profiler: about 10% of FastNet's CPU step)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).flatten(1)


class FastNet(nn.Module):
    """LeNet-style CNN with a strided first convolution: about 3 M multiply-adds per image at
    the default width, so an epoch is seconds on a CPU.

    The first layer is a 5x5 convolution with stride 2 instead of LeNet's convolution and
    2x2 pooling: the same 28 -> 14 reduction without a full-resolution activation map and
    its pooling, which (not the multiply-adds) dominated a CPU step (measured with
    torch.profiler: about 15% faster per epoch, the same accuracy within seeds).

    width: channels of the first convolution (W); the second has 2W, the hidden layer 4W.
    """

    def __init__(self, width: int = FAST_WIDTH) -> None:
        super().__init__()
        self.width = width
        w = width
        # In-place ReLUs: neither a convolution's nor a linear layer's gradient needs its
        # output, so overwriting it saves an allocation and a pass over memory per layer
        # (about 4% of a CPU step, measured).
        self.features = nn.Sequential(
            Standardize(),
            nn.Conv2d(1, w, 5, stride=2, padding=2),  # (B, 1, 28, 28) -> (B, W, 14, 14)
            nn.ReLU(inplace=True),
            nn.Conv2d(w, 2 * w, 5),  # -> (B, 2W, 10, 10)
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # -> (B, 2W, 5, 5)
            ChannelsLastFlatten(),  # -> (B, 50W)
        )
        self.head = nn.Sequential(
            nn.Linear(50 * w, 4 * w), nn.ReLU(inplace=True), nn.Linear(4 * w, 10)
        )

    # PyTorch's own way to mark a change of what the weights mean (as BatchNorm does): state
    # dicts carry it. 2: the first linear layer reads the features in (H, W, C) order.
    _version = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # type: ignore[no-any-return]

    def _load_from_state_dict(  # type: ignore[no-untyped-def]
        self, state_dict, prefix, local_metadata, *args, **kwargs
    ) -> None:
        # Same shapes, other order: weights saved before version 2 would load without an
        # error and predict nonsense, so their columns are reordered (C, H, W) -> (H, W, C).
        # (Older networks had other shapes: PyTorch's size-mismatch error tells of those.)
        key = prefix + "head.0.weight"
        weight = state_dict.get(key)
        out, channels = 4 * self.width, 2 * self.width
        old_order = local_metadata.get("version", 1) < 2
        if old_order and weight is not None and weight.shape == (out, channels * 25):
            state_dict[key] = weight.view(out, channels, 5, 5).permute(0, 2, 3, 1).flatten(1)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)


class ClassicNet(nn.Module):
    """The network of the PyTorch MNIST example (conv32-conv64-fc128), logits out."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            Standardize(),
            nn.Conv2d(1, 32, 3),  # (B, 1, 28, 28) -> (B, 32, 26, 26)
            nn.ReLU(),
            nn.Conv2d(32, 64, 3),  # -> (B, 64, 24, 24)
            nn.ReLU(),
            nn.MaxPool2d(2),  # -> (B, 64, 12, 12)
            nn.Dropout(0.25),
            nn.Flatten(),  # -> (B, 9216)
            nn.Linear(9216, 128),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(128, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]


def _conv_bn(c_in: int, c_out: int, kernel: int) -> list[nn.Module]:
    # No conv bias: batch norm's shift does its job.
    return [
        nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    ]


class QualityNet(nn.Module):
    """A batch-normalised CNN, trained with augmentation for the last tenths of a percent."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            Standardize(),
            *_conv_bn(1, 32, 5),  # (B, 1, 28, 28) -> (B, 32, 28, 28)
            nn.MaxPool2d(2),  # -> (B, 32, 14, 14)
            *_conv_bn(32, 64, 3),  # -> (B, 64, 14, 14)
            nn.MaxPool2d(2),  # -> (B, 64, 7, 7)
            *_conv_bn(64, 128, 3),  # -> (B, 128, 7, 7)
            nn.MaxPool2d(2),  # -> (B, 128, 3, 3)
            nn.Flatten(),  # -> (B, 1152)
            nn.Dropout(0.3),
            nn.Linear(1152, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]


class Ensemble(nn.Module):
    """Several networks answering as one, so that it is logged, exported to one ONNX graph and
    served like any single network.

    Each member's logits are divided by its temperature before the members' probabilities are
    averaged. The temperatures are fitted on the validation digits after training (temperature
    scaling; engines/plain.py): trained with label smoothing, a member is under-confident
    (fitted temperatures 0.45-0.48 for the quality preset's members), and averaging members
    put back on the scale their validation digits ask for ranks non-digits below digits
    better (measured: non-digit AUROC 0.941 -> 0.960 for four members; README). A
    temperature changes no member's argmax.

    Its output is the log of the members' mean probabilities: a softmax of it (what the
    export adds) gives exactly their averaged probabilities, and the abstain threshold, the
    metrics and the promotion read it like any network's logits.
    """

    # PyTorch's way to mark a change of what a state dict holds: 2 adds the temperatures.
    _version = 2
    temperatures: torch.Tensor  # (members,), a buffer

    def __init__(
        self, members: Sequence[nn.Module], temperatures: Sequence[float] | None = None
    ) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        if temperatures is None:
            temperatures = [1.0] * len(members)
        if len(temperatures) != len(members) or not all(t > 0 for t in temperatures):
            raise ValueError(f"one positive temperature per member, got {list(temperatures)}")
        self.register_buffer("temperatures", torch.tensor(list(temperatures), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In float32, whatever the members ran in (bf16 autocast): the average is the answer.
        log_probabilities = torch.stack(
            [
                (m(x).float() / self.temperatures[k]).log_softmax(1)
                for k, m in enumerate(self.members)
            ]
        )
        return log_probabilities.logsumexp(0) - math.log(len(self.members))

    def _load_from_state_dict(  # type: ignore[no-untyped-def]
        self, state_dict, prefix, local_metadata, *args, **kwargs
    ) -> None:
        # Ensembles saved before version 2 averaged their members as they were: temperature 1.
        key = prefix + "temperatures"
        if local_metadata.get("version", 1) < 2 and key not in state_dict:
            state_dict[key] = torch.ones(len(self.members))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    def __setstate__(self, state: dict[str, object]) -> None:
        # An ensemble pickled before version 2 (mlflow.pytorch's logged model) has no buffer.
        super().__setstate__(state)  # type: ignore[no-untyped-call]
        if "temperatures" not in self._buffers:
            self.register_buffer("temperatures", torch.ones(len(self.members)))


ARCHITECTURES: dict[str, type[nn.Module]] = {
    "fast": FastNet,
    "classic": ClassicNet,
    "quality": QualityNet,
}


def build(arch: str, members: int = 1) -> nn.Module:
    """A freshly initialised network of the named architecture; with members > 1, an
    Ensemble of that many."""
    if members == 1:
        return ARCHITECTURES[arch]()
    return Ensemble([ARCHITECTURES[arch]() for _ in range(members)])
