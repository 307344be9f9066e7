"""The reference the whole `mnistflow train` command is measured against: a tuned one-epoch CNN.

A plain, standalone PyTorch script, as someone would write it without mnistflow: the network
conv24-5x5 -> conv32-3x3 -> fc256, all 60,000 training images in memory as one normalised
float tensor, a plain loop over shuffled batches of 256, Adam with betas (0.7, 0.9) and a
one-cycle schedule to 1e-2, one epoch (about 99.06% test accuracy). Only the files come from
mnistflow.data, so that the reference reads the same verified MNIST (the mirror too).

Usage: python benchmarks/reference_cnn.py [--seed 0]
Prints one JSON line: train_seconds (the training loop), total_seconds (the whole script,
imports included, as measured from inside it) and test_accuracy.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # before the heavy imports, so total_seconds includes them

import argparse  # noqa: E402
import json  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from mnistflow import data  # noqa: E402
from mnistflow.config import DataConfig  # noqa: E402


def network() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 24, 5),  # (B, 1, 28, 28) -> (B, 24, 24, 24)
        nn.ReLU(),
        nn.MaxPool2d(2),  # -> (B, 24, 12, 12)
        nn.Conv2d(24, 32, 3),  # -> (B, 32, 10, 10)
        nn.ReLU(),
        nn.MaxPool2d(2),  # -> (B, 32, 5, 5)
        nn.Flatten(),  # -> (B, 800)
        nn.Linear(800, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )


def load() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """All 60,000 training and 10,000 test images, normalised floats (N, 1, 28, 28)."""
    paths, _ = data.fetch(DataConfig())

    def images(name: str) -> torch.Tensor:
        x = torch.from_numpy(data.read_idx(paths[name]).copy()).float().div_(255)
        return ((x - 0.1307) / 0.3081).unsqueeze(1)

    def labels(name: str) -> torch.Tensor:
        return torch.from_numpy(data.read_idx(paths[name]).astype("int64"))

    return (
        images("train-images-idx3-ubyte.gz"),
        labels("train-labels-idx1-ubyte.gz"),
        images("t10k-images-idx3-ubyte.gz"),
        labels("t10k-labels-idx1-ubyte.gz"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    train_x, train_y, test_x, test_y = load()
    model = network()
    batch_size, epochs = 256, 1
    steps = -(-len(train_y) // batch_size) * epochs
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.7, 0.9))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=steps)

    started = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_y))
        for start in range(0, len(train_y), batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(model(train_x[idx]), train_y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    train_seconds = time.perf_counter() - started

    model.eval()
    with torch.inference_mode():
        predictions = torch.cat([model(x).argmax(1) for x in test_x.split(2000)])
    accuracy = (predictions == test_y).float().mean().item()
    result = {
        "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - STARTED,
        "test_accuracy": accuracy,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
