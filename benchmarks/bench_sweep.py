"""Sweep benchmarks, side by side in one run:

1. Pruning: the same number of trials on a training slice with the median pruner and without
   (same sampler seed): wall time, trials pruned, best validation accuracy.
2. Workers: the same sweep (no pruning) with 1 and with 2 local worker processes.
3. Overhead: the sweep machinery's time per trial outside training (fit(), which includes
   the per-epoch validation the pruner needs), on the fast preset with the full training
   set: run start and end, params, tags, dataset inputs, the weights checkpoint, Optuna's
   ask/tell and storage, the parent's per-trial metrics. Target: < 5% of fit() time.

Every sweep gets a fresh MLflow store and Optuna journal in a temporary folder.
Usage: python benchmarks/bench_sweep.py [--trials 16] [--limit-train 10000]
       [--overhead-trials 3]
Prints Markdown tables (the README's) and writes benchmarks/results/sweep.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna

from common import RESULTS, table
from mnistflow.config import TrackingConfig
from mnistflow.sweep.definition import SweepConfig, SweepDefinition
from mnistflow.sweep.storage import open_storage
from mnistflow.sweep.study import run_sweep


@contextlib.contextmanager
def in_folder(folder: Path) -> Iterator[None]:
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def sweep_once(
    trials: int, workers: int, definition: SweepDefinition, seed: int = 0
) -> dict[str, Any]:
    """One sweep in a fresh store; its summary plus per-trial timings from the study."""
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp, in_folder(Path(tmp)):
        started = time.perf_counter()
        summary = run_sweep(
            SweepConfig(
                study="bench",
                storage=str(Path(tmp) / "study.log"),
                trials=trials,
                workers=workers,
                definition=definition,
                sampler_seed=seed,
            ),
            TrackingConfig(tracking_uri=f"sqlite:///{tmp}/mlflow.db", system_metrics=False),
        )
        wall = time.perf_counter() - started
        study = optuna.load_study(
            study_name="bench", storage=open_storage(str(Path(tmp) / "study.log"))
        )
        ended = [t for t in study.trials if t.datetime_complete is not None]
        fit = [t.user_attrs["fit_seconds"] for t in ended]
        inside = [t.user_attrs["trial_seconds"] - t.user_attrs["fit_seconds"] for t in ended]
        # Sweep time from the first trial's start to the last trial's end, less the time in
        # fit(): run set-up and tear-down, Optuna's ask/tell, the parent's metrics.
        first = min(t.datetime_start for t in ended if t.datetime_start is not None)
        last = max(t.datetime_complete for t in ended if t.datetime_complete is not None)
        span = (last - first).total_seconds()
        result = {
            "trials": len(ended),
            "workers": workers,
            "pruner": definition.pruner,
            "wall_seconds": wall,
            "trials_pruned": summary.trials_pruned,
            "best_val_accuracy": summary.best_val_accuracy,
            "best_test_accuracy": summary.best_test_accuracy,
            "fit_seconds_mean": statistics.mean(fit),
            "fit_seconds_total": sum(fit),
            "trial_overhead_seconds_mean": statistics.mean(inside),
            # With one worker the trials run back to back, so this is the machinery's share.
            "sweep_overhead_per_trial": (span - sum(fit)) / len(ended) if workers == 1 else None,
        }
        print(json.dumps(result), flush=True)  # each sweep as it ends, for long runs
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--limit-train", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--overhead-trials", type=int, default=3)
    parser.add_argument(
        "--overhead-limit-train", type=int, default=None, help="default: all 55,000 images"
    )
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)

    sliced = {"epochs": args.epochs, "limit_train": args.limit_train}
    pruned = sweep_once(args.trials, 1, SweepDefinition(pruner="median", **sliced))
    unpruned = sweep_once(args.trials, 1, SweepDefinition(pruner="none", **sliced))
    two = sweep_once(args.trials, 2, SweepDefinition(pruner="none", **sliced))
    overhead = sweep_once(
        args.overhead_trials,
        1,
        SweepDefinition(pruner="none", limit_train=args.overhead_limit_train),
    )
    results = {
        "args": vars(args),
        "cpu_count": os.cpu_count(),
        "pruning": [pruned, unpruned],
        "workers": [unpruned, two],
        "overhead": overhead,
    }

    print(f"\n{args.trials} trials, fast preset, {args.limit_train} training images, "
          f"{args.epochs} epochs\n")  # fmt: skip
    print(
        table(
            ["pruner", "workers", "wall s", "trials pruned", "best val acc", "mean fit() s"],
            [
                [
                    r["pruner"],
                    r["workers"],
                    f"{r['wall_seconds']:.1f}",
                    f"{r['trials_pruned']}/{r['trials']}",
                    f"{r['best_val_accuracy']:.4f}",
                    f"{r['fit_seconds_mean']:.2f}",
                ]
                for r in (pruned, unpruned, two)
            ],
        )
    )
    share = overhead["sweep_overhead_per_trial"] / overhead["fit_seconds_mean"]
    images = args.overhead_limit_train or "all 55,000"
    print(f"\nOverhead, fast preset on {images} training images, {args.overhead_trials} trials\n")
    print(
        table(
            ["mean fit() s", "overhead per trial s", "of which inside the trial s", "share"],
            [
                [
                    f"{overhead['fit_seconds_mean']:.2f}",
                    f"{overhead['sweep_overhead_per_trial']:.3f}",
                    f"{overhead['trial_overhead_seconds_mean']:.3f}",
                    f"{share:.1%}",
                ]
            ],
        )
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sweep.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
