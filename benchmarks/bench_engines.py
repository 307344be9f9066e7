"""The two training engines side by side: the plain loop against Lightning under MLflow autolog,
and Lightning on one against two DDP processes, on full MNIST with the same preset and seed.

Every configuration is the real command (`mnistflow train --json`) in a fresh process,
recording its run to a sqlite store in a temporary folder; the configurations take turns in
each round (interleaved, so a busy spell hits them alike) and medians over the rounds are
compared. Training time is each engine's `train_seconds` (the training loops only: data
loading, validation and logging the models excluded); the whole command's time is shown too.

Usage: python benchmarks/bench_engines.py [--rounds 3] [--preset fast] [--seed 0]
       [--limit-train N]  (a quick check on N training images; the README's numbers use all)
Prints the README's Markdown table and writes benchmarks/results/engines.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import RESULTS, rotated, table

CONFIGS: dict[str, list[str]] = {
    "plain": ["--engine", "plain"],
    "lightning": ["--engine", "lightning"],
    "lightning, 2 DDP processes": ["--engine", "lightning", "--devices", "2"],
}


def train(
    args: list[str], preset: str, seed: int, folder: Path, limit: int | None
) -> dict[str, Any]:
    """One `mnistflow train` in a fresh process; its --json line."""
    command = [sys.executable, "-m", "mnistflow", "train", "--preset", preset]
    command += ["--limit-train", str(limit)] if limit else []
    command += ["--seed", str(seed), "--device", "cpu", "--no-system-metrics", "--json"]
    command += ["--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}", *args]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["command_seconds"] = time.perf_counter() - started
    return result


def spread(values: list[float], unit: str = "s") -> str:
    return f"{statistics.median(values):.1f} {unit} ({min(values):.1f}-{max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs of each configuration")
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--limit-train", type=int, help="train on N images only: a quick check, not the result"
    )
    options = parser.parse_args()

    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="bench-engines-") as tmp:
        for round_ in range(options.rounds):
            # The order rotates: with a fixed order on this shared host, whichever ran second
            # in a round was slower in every round (plain: 4.1 s first, 7.2 s second), which
            # would always handicap the same configuration.
            for name in rotated(list(CONFIGS), round_):
                args = CONFIGS[name]
                result = train(args, options.preset, options.seed, Path(tmp), options.limit_train)
                runs[name].append(result)
                print(
                    f"round {round_ + 1}: {name}: train {result['train_seconds']:.1f} s, "
                    f"test accuracy {result['test_accuracy']:.4f}",
                    file=sys.stderr,
                )

    plain = statistics.median(r["train_seconds"] for r in runs["plain"])
    rows = []
    summary: dict[str, Any] = {}
    for name, results in runs.items():
        train_s = [r["train_seconds"] for r in results]
        accuracy = [r["test_accuracy"] for r in results]
        summary[name] = {
            "train_seconds_median": statistics.median(train_s),
            "ratio_to_plain": statistics.median(train_s) / plain,
            "test_accuracy_median": statistics.median(accuracy),
            "runs": results,
        }
        rows.append(
            [
                name,
                spread(train_s),
                f"{statistics.median(train_s) / plain:.2f}x",
                f"{statistics.median(accuracy):.2%}",
                spread([r["total_seconds"] for r in results]),
            ]
        )
    print(
        table(
            ["engine", "training time, median (range)", "vs plain", "test accuracy", "whole run"],
            rows,
        )
    )
    print(
        f"\n{options.preset} preset, seed {options.seed}, "
        f"{options.limit_train or 'all'} training images, {options.rounds} rounds "
        f"interleaved; {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})."
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "engines.json").write_text(
        json.dumps(
            {"preset": options.preset, "seed": options.seed, "limit_train": options.limit_train}
            | summary,
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
