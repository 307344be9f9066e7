"""Batch inference benchmark, side by side with MLflow's own tool in one run:

1. Throughput of classifying the 10,000 MNIST test images with the registered model, model
   load excluded (ONNX Runtime inside the pyfunc), median of several passes.
2. The whole `mnistflow predict t10k-images-idx3-ubyte.gz` command against
   `mlflow models predict` for the same model and the same 10,000 digits (given to MLflow
   as its JSON request, since it cannot read IDX), start-up included, median of several runs.

Usage: python benchmarks/bench_inference.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from common import BIN, RESULTS, table, tool_env
from mnistflow import data
from mnistflow.config import DataConfig, TrackingConfig, preset_config
from mnistflow.inference import batch as inference
from mnistflow.lifecycle import registry
from mnistflow.runs.plain import train_run


def registered_champion(folder: Path) -> str:
    """A fast-preset model (architecture as served; accuracy does not matter for speed)."""
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    summary = train_run(
        DataConfig(limit_train=5000),
        preset_config("fast", epochs=1, device="cpu"),
        TrackingConfig(tracking_uri=uri, system_metrics=False),
        register_as="mnist",
    )
    assert summary.registered_version
    registry.make_champion(MlflowClient(uri), "mnist", summary.registered_version, "benchmark")
    return uri


def timed(args: list[str], uri: str, cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run(
        args, env=tool_env(MLFLOW_TRACKING_URI=uri), cwd=cwd, check=True, capture_output=True
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config = DataConfig()
    test = data.load(config).test
    pixels = test.images[:, 0].numpy().astype(np.float32)  # (10000, 28, 28)
    results: dict[str, Any] = {}
    # In a temporary folder: MLflow puts a sqlite store's artifacts in ./mlruns.
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        folder = Path(tmp)
        uri = registered_champion(folder)
        mlflow.set_tracking_uri(uri)

        classifier, _ = inference.load_classifier("models:/mnist@champion")
        inference.classify(classifier, pixels[:2048])  # warm-up
        passes = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            labels, _ = inference.classify(classifier, pixels)
            passes.append(time.perf_counter() - started)
        rate = len(pixels) / statistics.median(passes)
        accuracy = float((labels == test.labels.numpy()).mean())
        results["images_per_second"] = rate
        print(
            table(
                ["what", "images", "time (median)", "images/s"],
                [
                    [
                        "classify the test set, model loaded",
                        "10,000",
                        f"{statistics.median(passes) * 1000:.0f} ms",
                        f"{rate:,.0f}",
                    ]
                ],
            )
        )
        print(f"(accuracy of this 1-epoch, 5k-image model: {accuracy:.2%})\n")

        idx = data.fetch(config)[0]["t10k-images-idx3-ubyte.gz"]
        request = folder / "request.json"
        request.write_text(json.dumps({"inputs": pixels.tolist()}))
        ours = [str(BIN / "mnistflow"), "predict", str(idx), "--output", str(folder / "a.csv")]
        theirs = [
            str(BIN / "mlflow"), "models", "predict", "-m", "models:/mnist@champion",
            "-i", str(request), "-t", "json", "-o", str(folder / "b.json"),
            "--env-manager", "local",
        ]  # fmt: skip
        times: dict[str, list[float]] = {"mnistflow predict": [], "mlflow models predict": []}
        for _ in range(args.repeats):
            times["mnistflow predict"].append(timed(ours, uri, folder))
            times["mlflow models predict"].append(timed(theirs, uri, folder))
        ours_labels = np.loadtxt(folder / "a.csv", delimiter=",", skiprows=1, usecols=1)
        theirs_labels = [
            p["label"] for p in json.loads((folder / "b.json").read_text())["predictions"]
        ]
        assert np.array_equal(ours_labels, theirs_labels), "the two tools disagree"
    base = statistics.median(times["mlflow models predict"])
    rows = [
        [
            tool,
            f"{statistics.median(t):.2f} s",
            f"{min(t):.2f}-{max(t):.2f} s",
            f"{base / statistics.median(t):.1f}x",
        ]
        for tool, t in times.items()
    ]
    print("Whole command, 10,000 test digits, start-up and model load included")
    print(table(["command", "wall time (median)", "min-max", "speed vs mlflow"], rows))
    results["commands"] = times
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "inference.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
