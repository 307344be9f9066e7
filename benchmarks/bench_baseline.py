"""The scikit-learn baseline and MLflow Projects, each measured beside its reference in one run:

1. Baseline against the CNN's fast preset on the same splits (full MNIST by default): training
   time (fitting only; the baseline's excludes what autolog logs after the fit), the whole
   tracked run, and test accuracy. Both are complete tracked runs in a temp sqlite store.
2. `mlflow run . -e train --env-manager local` against `mnistflow train` called directly,
   with the same small training (start-up included: each is a fresh process). Interleaved,
   medians compared, overhead given as a ratio.

Usage: python benchmarks/bench_baseline.py [--repeats 3] [--limit-train N] [--project-limit 2000]
Prints Markdown tables (the README's) and writes benchmarks/results/baseline.json.
About 6 minutes on a quiet 2-core machine with the defaults.
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

from common import RESULTS, table, tool_env
from mnistflow.config import DataConfig, TrackingConfig, preset_config
from mnistflow.engines.sklearn import BaselineConfig
from mnistflow.runs.baseline import baseline_run
from mnistflow.runs.plain import train_run

ROOT = Path(__file__).resolve().parents[1]


def bench_baseline_vs_cnn(limit_train: int | None, store: str) -> list[dict[str, Any]]:
    data_config = DataConfig(limit_train=limit_train)
    results = []
    for name in ("baseline", "fast"):
        tracking = TrackingConfig(tracking_uri=store, experiment="bench", system_metrics=False)
        if name == "baseline":
            summary = baseline_run(data_config, BaselineConfig(), tracking)
        else:
            summary = train_run(data_config, preset_config("fast", device="cpu"), tracking)
        results.append(
            {
                "model": name,
                "train_seconds": summary.train_seconds,
                "total_seconds": summary.total_seconds,
                "test_accuracy": summary.test_accuracy,
            }
        )
        print(results[-1], file=sys.stderr)
    return results


def timed(args: list[str], cwd: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(args, cwd=cwd, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def bench_project_overhead(repeats: int, limit_train: int, folder: Path) -> dict[str, Any]:
    """Wall time of the same training through `mlflow run` and directly, interleaved."""
    store = f"sqlite:///{folder / 'projects.db'}"
    env = tool_env(MLFLOW_TRACKING_URI=store)
    # Part 1's set_experiment() exported its experiment's id; `mlflow run --experiment-name`
    # refuses to run with both.
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    python = sys.executable
    direct = [
        python, "-m", "mnistflow", "train", "--epochs", "1", "--limit-train", str(limit_train),
        "--no-system-metrics", "--experiment", "direct",
    ]  # fmt: skip
    project = [
        python, "-m", "mlflow", "run", str(ROOT), "-e", "train", "-P", "epochs=1",
        "-P", f"limit_train={limit_train}", "-P", "system_metrics=false",
        "--env-manager", "local", "--experiment-name", "project",
    ]  # fmt: skip
    # The direct call must run this checkout's code too, as the project's entry point does.
    env_direct = {**env, "PYTHONPATH": str(ROOT / "src")}
    times: dict[str, list[float]] = {"direct": [], "mlflow run": []}
    timed(direct, folder, env_direct)  # warm the page cache and the store's tables
    for _ in range(repeats):
        times["direct"].append(timed(direct, folder, env_direct))
        times["mlflow run"].append(timed(project, folder, env))
        print({k: round(v[-1], 1) for k, v in times.items()}, file=sys.stderr)
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {
        "times": times,
        "medians": medians,
        "ratio": medians["mlflow run"] / medians["direct"],
        "limit_train": limit_train,
        "repeats": repeats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each kind in part 2")
    parser.add_argument("--limit-train", type=int, default=None, help="part 1 (default: all)")
    parser.add_argument("--project-limit", type=int, default=2000, help="part 2's images")
    parser.add_argument("--only", choices=["models", "project"], help="run one part only")
    args = parser.parse_args()

    models: list[dict[str, Any]] = []
    overhead: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-baseline-") as tmp:
        folder = Path(tmp)
        if args.only != "project":
            models = bench_baseline_vs_cnn(args.limit_train, f"sqlite:///{folder / 'bench.db'}")
        if args.only != "models":
            overhead = bench_project_overhead(args.repeats, args.project_limit, folder)

    size = f"{args.limit_train:,} training images" if args.limit_train else "full MNIST"
    if models:
        print(f"\nBaseline against the CNN ({size}, CPU):\n")
        print_models(models)
    if overhead:
        print_overhead(overhead, args.project_limit, args.repeats)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "baseline.json").write_text(
        json.dumps({"models": models, "project_overhead": overhead}, indent=2)
    )


def print_models(models: list[dict[str, Any]]) -> None:
    print(
        table(
            ["model", "training (s)", "whole tracked run (s)", "test accuracy"],
            [
                [
                    "scikit-learn baseline (PCA 50 + logistic regression)"
                    if r["model"] == "baseline"
                    else "CNN, fast preset (2 epochs)",
                    f"{r['train_seconds']:.1f}",
                    f"{r['total_seconds']:.1f}",
                    f"{r['test_accuracy']:.2%}",
                ]
                for r in models
            ],
        )
    )


def print_overhead(overhead: dict[str, Any], limit: int, repeats: int) -> None:
    m = overhead["medians"]
    print(
        f"\n`mlflow run --env-manager local` against `mnistflow train` (1 epoch on "
        f"{limit:,} images, start-up included, median of {repeats}):\n"
    )
    print(
        table(
            ["how", "median wall time (s)", "ratio"],
            [
                ["mnistflow train", f"{m['direct']:.1f}", "1.00"],
                ["mlflow run . -e train", f"{m['mlflow run']:.1f}", f"{overhead['ratio']:.2f}"],
            ],
        )
    )


if __name__ == "__main__":
    main()
