"""The presets' promises, measured: each preset's whole `mnistflow train` over several seeds,
as a user runs it, into a throwaway store; the numbers are read back from the runs.

Per preset: training time (train_seconds, the training loops) and the whole command's time,
test accuracy (median, mean +- sd), accuracy on other writers' digits, the non-digit AUROC,
the share of clothes and of test digits the abstain threshold turns away, the served ONNX
model's size and its cost per image (ONNX Runtime, one thread, batches of 256).

Seeds run preset by preset, interleaved (seed 0 of every preset, then seed 1, ...), so that a
slow spell of this shared machine does not land on one preset alone.

Usage: python benchmarks/bench_presets.py [--presets fast balanced quality] [--seeds 5] [--report]
Prints a Markdown table (the README's) and writes benchmarks/results/presets.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from common import RESULTS, table, tool_env

METRICS = (
    "train_seconds", "test_accuracy", "writers_accuracy", "nondigit_auroc",
    "nondigit_abstain_rate", "test_abstain_rate",
)  # fmt: skip


def train(preset: str, seed: int, store: Path) -> dict[str, Any]:
    """One whole `mnistflow train`; its logged metrics, its model's size and cost, its time."""
    import mlflow
    import onnxruntime as ort

    uri = f"sqlite:///{store / 'mlflow.db'}"
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "mnistflow", "train", "--preset", preset, "--seed", str(seed),
         "--tracking-uri", uri, "--no-system-metrics", "--json"],
        cwd=store, env=tool_env(), capture_output=True, text=True, check=False,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{preset} seed {seed} failed:\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    client = mlflow.MlflowClient(uri)
    metrics = client.get_run(summary["run_id"]).data.metrics
    model = client.get_logged_model(summary["model_uri"].removeprefix("models:/"))
    onnx = next(Path(model.artifact_location.removeprefix("file://")).rglob("*.onnx"))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(onnx), options, providers=["CPUExecutionProvider"])
    pixels = np.random.default_rng(0).uniform(0, 255, (256, 1, 28, 28)).astype(np.float32)
    session.run(None, {"pixels": pixels})
    runs = []
    for _ in range(20):
        tick = time.perf_counter()
        session.run(None, {"pixels": pixels})
        runs.append((time.perf_counter() - tick) / len(pixels))
    return {
        **{key: metrics[key] for key in METRICS},
        "command_seconds": seconds,
        "model_kib": onnx.stat().st_size / 1024,
        "us_per_image": statistics.median(runs) * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["fast", "balanced", "quality"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument(
        "--report", action="store_true",
        help="train nothing: print the table of the runs saved in results/presets.json",
    )  # fmt: skip
    args = parser.parse_args()
    if args.report:
        saved = json.loads((RESULTS / "presets.json").read_text())
        report({preset: runs for preset, runs in saved.items() if runs})
        return

    results: dict[str, list[dict[str, Any]]] = {p: [] for p in args.presets}
    with tempfile.TemporaryDirectory(prefix="bench-presets-") as tmp:
        for seed in range(args.seeds):
            for preset in args.presets:
                store = Path(tmp) / f"{preset}-{seed}"
                store.mkdir()
                results[preset].append(train(preset, seed, store))
                # Written after every run: a benchmark stopped early keeps what it measured.
                RESULTS.mkdir(exist_ok=True)
                (RESULTS / "presets.json").write_text(json.dumps(results, indent=1))
                r = results[preset][-1]
                print(
                    f"{preset} seed {seed}: test {r['test_accuracy']:.4f}, writers "
                    f"{r['writers_accuracy']:.4f}, train {r['train_seconds']:.1f} s",
                    flush=True,
                )

    report(results)


def report(results: dict[str, list[dict[str, Any]]]) -> None:
    """The README's table: per preset, medians and spreads over its seeds."""

    def spread(values: list[float], scale: float = 100, digits: int = 2) -> str:
        """median (mean ± sd), in percent by default."""
        mean, sd = statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
        median = statistics.median(values)
        return f"{median * scale:.{digits}f} ({mean * scale:.{digits}f} ± {sd * scale:.{digits}f})"

    rows = []
    for preset, runs in results.items():
        column = {key: [r[key] for r in runs] for key in runs[0]}
        rows.append(
            [
                preset,
                f"{statistics.median(column['train_seconds']):.1f} s",
                f"{statistics.median(column['command_seconds']):.1f} s",
                spread(column["test_accuracy"]) + " %",
                f"{min(column['test_accuracy']):.2%} to {max(column['test_accuracy']):.2%}",
                spread(column["writers_accuracy"], digits=1) + " %",
                f"{statistics.median(column['nondigit_auroc']):.4f}",
                f"{statistics.median(column['nondigit_abstain_rate']) * 100:.1f} % / "
                f"{statistics.median(column['test_abstain_rate']) * 100:.1f} %",
                f"{statistics.median(column['model_kib']):.0f} KiB",
                f"{statistics.median(column['us_per_image']):.1f} µs",
            ]
        )
    header = [
        "preset", "training (median)", "whole command", "test accuracy: median (mean ± sd)",
        "range", "other writers: median (mean ± sd)", "non-digit AUROC",
        "clothes / test digits turned away", "ONNX size", "cost per image",
    ]  # fmt: skip
    seeds = ", ".join(f"{preset}: {len(runs)}" for preset, runs in results.items())
    print(f"\nSeeds run ({seeds}), interleaved:\n")
    print(table(header, rows))


if __name__ == "__main__":
    main()
