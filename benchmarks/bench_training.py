"""Training benchmarks, each side by side with its reference in one run:

1. Time to 99.0% test accuracy: the fast (default) preset against the `classic` PyTorch-example
   recipe, pure training time (data loading and evaluation excluded), median of several seeds.
2. Tracking overhead: the fast preset's training time with every step's loss and learning
   rate plus the epoch metrics logged (async, the default) to the embedded sqlite store and to
   a local `mlflow server`, against tracking switched off. Runs are interleaved, medians compared.
3. The quality preset's accuracy and time (--quality; about ten minutes on 2 cores).

These time fit() in-process after a warm-up run: they compare recipes and tracking modes with
everything else held still. What a user sees, the whole `mnistflow train` command in a fresh
process (start-up, first-use costs, progress bar, system metrics and all), is timed by
bench_command.py, and that is the README's headline figure.

Usage: python benchmarks/bench_training.py [--seeds 3] [--repeats 9] [--quality]
       [--classic-epochs 8 (0: the fast preset alone)] [--only accuracy|tracking|quality]
Prints Markdown tables (the README's) and writes benchmarks/results/training.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from common import RESULTS, mlflow_server, table
from mnistflow import data
from mnistflow.config import DataConfig, TrackingConfig, preset_config
from mnistflow.engines.plain import evaluate, fit
from mnistflow.lifecycle import networks as models
from mnistflow.reporting import Reporter
from mnistflow.tracking import TrackedRun


class TestAccuracyWatch(Reporter):
    """Evaluates the model on the test set after every epoch (outside the timed loop) and
    records the training time at which it first reached the target."""

    def __init__(self, model: torch.nn.Module, test: data.Split, target: float) -> None:
        self.model, self.test, self.target = model, test, target
        self.elapsed = 0.0
        self.reached: float | None = None
        self.accuracies: list[float] = []

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        self.elapsed += metrics["epoch_seconds"]
        accuracy = evaluate(self.model, self.test).accuracy
        self.accuracies.append(accuracy)
        if self.reached is None and accuracy >= self.target:
            self.reached = self.elapsed


def time_to_accuracy(
    preset: str, seed: int, splits: data.MnistSplits, target: float, epochs: int | None = None
) -> dict[str, Any]:
    config = preset_config(preset, seed=seed, device="cpu", epochs=epochs)
    torch.manual_seed(seed)
    model = models.build(config.arch)
    watch = TestAccuracyWatch(model, splits.test, target)
    result = fit(config, splits.train, splits.val, watch, model=model)
    return {
        "preset": preset,
        "seed": seed,
        "epochs": config.epochs,
        "train_seconds": result.train_seconds,
        "final_test_accuracy": watch.accuracies[-1],
        "test_accuracy_per_epoch": watch.accuracies,
        "seconds_to_target": watch.reached,
    }


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} s ({min(values):.1f}-{max(values):.1f})"


def bench_time_to_accuracy(
    splits: data.MnistSplits, seeds: int, classic_epochs: int
) -> dict[str, Any]:
    target = 0.99
    fast = [time_to_accuracy("fast", s, splits, target) for s in range(seeds)]
    # The classic recipe is 14 epochs; its step schedule does not depend on the total, so
    # its first epochs are the same whatever the total: stopping early times the same path.
    # 0 epochs: the fast preset alone (the classic runs take most of this benchmark's time).
    classic = [
        time_to_accuracy("classic", s, splits, target, epochs=classic_epochs)
        for s in range(seeds if classic_epochs else 0)
    ]
    for runs in (fast, classic):
        for r in runs:
            print(
                f"{r['preset']:8s} seed {r['seed']}: per-epoch test accuracy "
                f"{[round(a, 4) for a in r['test_accuracy_per_epoch']]}, "
                f"{r['train_seconds']:.1f} s, reached 99.0% at {r['seconds_to_target']}",
                flush=True,
            )
    fast_times = [r["train_seconds"] for r in fast]  # its fixed schedule is the whole run
    classic_times = [r["seconds_to_target"] for r in classic if r["seconds_to_target"]]
    rows = [
        [
            "fast (default)",
            f"{statistics.median(r['final_test_accuracy'] for r in fast):.2%}",
            f"{sum(r['final_test_accuracy'] >= target for r in fast)}/{len(fast)}",
            spread(fast_times),
        ],
    ]
    if classic:
        rows.append(
            [
                "classic (PyTorch example)",
                f"{statistics.median(max(r['test_accuracy_per_epoch']) for r in classic):.2%}",
                f"{len(classic_times)}/{len(classic)}",
                spread(classic_times) if classic_times else f"not in {classic_epochs} epochs",
            ]
        )
    ratio = (
        statistics.median(classic_times) / statistics.median(fast_times) if classic_times else None
    )
    print(
        table(
            ["preset", "test accuracy (median)", "seeds reaching 99.0%", "time to 99.0% (min-max)"],
            rows,
        )
    )
    if ratio:
        print(f"\nfast reaches 99.0% {ratio:.1f}x sooner than classic.\n")
    return {"fast": fast, "classic": classic, "ratio": ratio}


def train_seconds(splits: data.MnistSplits, tracking: TrackingConfig | None) -> float:
    config = preset_config("fast", device="cpu")
    if tracking is None:
        return fit(config, splits.train, splits.val).train_seconds
    with TrackedRun(tracking) as run:
        return fit(config, splits.train, splits.val, run).train_seconds


def bench_tracking_overhead(splits: data.MnistSplits, repeats: int) -> dict[str, Any]:
    # In a temporary folder: MLflow puts a sqlite store's artifacts in ./mlruns.
    with (
        tempfile.TemporaryDirectory() as tmp,
        contextlib.chdir(tmp),
        mlflow_server(Path(tmp) / "server") as server,
    ):
        sqlite = f"sqlite:///{tmp}/bench.db"
        # What the issue measures is the metric logging itself, so system metrics are off
        # except in the row that shows what MLflow's sampling thread adds on top. "off,
        # again" is an A/A control: its difference from "off" is the noise floor.
        modes = {
            "off": None,
            "sqlite, async": TrackingConfig(tracking_uri=sqlite, system_metrics=False),
            "sqlite, sync": TrackingConfig(
                tracking_uri=sqlite, async_logging=False, system_metrics=False
            ),
            "mlflow server, async": TrackingConfig(tracking_uri=server, system_metrics=False),
            "sqlite, async, + system metrics (default)": TrackingConfig(tracking_uri=sqlite),
            "off, again": None,
        }
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        train_seconds(splits, None)  # warm-up: first-use costs of oneDNN kernels
        for i in range(repeats):
            for mode, tracking in modes.items():
                times[mode].append(train_seconds(splits, tracking))
                print(f"repeat {i}: {mode:22s} {times[mode][-1]:.2f} s", flush=True)
    base = statistics.median(times["off"])
    rows = []
    for mode, values in times.items():
        median = statistics.median(values)
        overhead = "-" if mode == "off" else f"{(median / base - 1):+.1%}"
        rows.append([mode, f"{median:.2f} s", f"{min(values):.2f}-{max(values):.2f} s", overhead])
    config = preset_config("fast")
    steps = config.epochs * -(-len(splits.train) // config.batch_size)
    print(
        f"\nTracking overhead ({steps} steps x 2 metrics + {config.epochs} epoch(s) x 6 metrics "
        "per run)"
    )
    print(table(["tracking", "train time (median)", "min-max", "overhead"], rows))
    return {"times": times}


def bench_quality(splits: data.MnistSplits) -> dict[str, Any]:
    config = preset_config("quality", device="cpu")
    started = time.perf_counter()
    result = fit(config, splits.train, splits.val)
    accuracy = evaluate(result.model, splits.test).accuracy
    print(
        table(
            ["preset", "epochs", "test accuracy", "train time"],
            [["quality", str(config.epochs), f"{accuracy:.2%}", f"{result.train_seconds:.0f} s"]],
        )
    )
    return {
        "test_accuracy": accuracy,
        "train_seconds": result.train_seconds,
        "wall_seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per preset (default 3)")
    parser.add_argument("--repeats", type=int, default=9, help="runs per tracking mode (default 9)")
    parser.add_argument(
        "--classic-epochs",
        type=int,
        default=8,
        help="epochs the classic reference gets (8; 0 skips it)",
    )
    parser.add_argument("--quality", action="store_true", help="also train the quality preset")
    parser.add_argument(
        "--only", choices=["accuracy", "tracking", "quality"], help="run just one part"
    )
    args = parser.parse_args()
    splits = data.load(DataConfig())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU only\n")
    results: dict[str, Any] = {}
    if args.only in (None, "accuracy"):
        results["time_to_accuracy"] = bench_time_to_accuracy(
            splits, args.seeds, args.classic_epochs
        )
    if args.only in (None, "tracking"):
        results["tracking_overhead"] = bench_tracking_overhead(splits, args.repeats)
    if args.quality or args.only == "quality":
        results["quality"] = bench_quality(splits)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "training.json"
    # Parts run separately (--only) update their own entries.
    earlier = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**earlier, **results}, indent=1))


if __name__ == "__main__":
    main()
