"""The number a user sees: the whole `mnistflow train` command against a reference CNN script.

Runs `python -m mnistflow train --json` exactly as a user would (default flags: the fast
preset, tracking to ./mlflow.db with async logging and system metrics, the progress bar, the
model logging and reports) and benchmarks/reference_cnn.py (a plain one-epoch PyTorch loop,
about 99.06%), interleaved, for N rounds; the order alternates between rounds so neither side
always runs on a warmer machine. Both run in a temporary folder, each as a fresh process.

Reported per side: training time (what each prints: the command's train_seconds, the
reference's loop), wall time of the whole process (interpreter start-up and imports included,
timed from here), test accuracy; and the ratio command / reference training time.

The command's store is created by an untimed warm-up run (which also warms the file cache for
both), so the timed rounds are a user's second and later runs, not the one-off schema creation.

Round i runs every side with --seed i, so the accuracy column is a spread over seeds.

Usage: python benchmarks/bench_command.py [--rounds 5] [--fp32]   (about 3 minutes on 2 idle
cores; --fp32 adds the command with --precision fp32 as a third side)
Prints the Markdown table the README shows and writes benchmarks/results/command.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import RESULTS, rotated, table

HERE = Path(__file__).resolve().parent
COMMAND = [sys.executable, "-m", "mnistflow", "train", "--json"]
REFERENCE = [sys.executable, str(HERE / "reference_cnn.py")]
# Output is captured here, but a user watches the progress bar on a terminal: rich is told the
# pipes are one (https://rich.readthedocs.io/en/latest/console.html#environment-variables), so
# the bar redraws as it would for them.
TERMINAL = {"TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1", "COLUMNS": "100"}
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run(args: list[str], cwd: Path) -> dict[str, Any]:
    """Run one process to the end; its last stdout line (JSON) plus the wall time from here."""
    env = {**os.environ, **TERMINAL}
    started = time.perf_counter()
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited with {proc.returncode}:\n{proc.stderr}")
    last_line = ANSI.sub("", proc.stdout.strip().splitlines()[-1])
    result: dict[str, Any] = json.loads(last_line)
    return {**result, "wall_seconds": wall}


def spread(values: list[float], unit: str = " s", digits: int = 1) -> str:
    return (
        f"{statistics.median(values):.{digits}f}{unit} "
        f"({min(values):.{digits}f}-{max(values):.{digits}f})"
    )


def percent(values: list[float]) -> str:
    return f"{statistics.median(values):.2%} ({min(values):.2%}-{max(values):.2%})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument(
        "--fp32",
        action="store_true",
        help="also time the command with --precision fp32 (what a CPU without bf16 gets)",
    )
    args = parser.parse_args()
    if not os.environ.get("MNISTFLOW_MNIST_MIRROR"):
        print("MNISTFLOW_MNIST_MIRROR is not set: MNIST comes from the cache or is downloaded.")

    # (row label, argv, results); round i trains every side with seed i, so the accuracy
    # column shows the spread over seeds, not one seed repeated.
    sides: list[tuple[str, list[str], list[dict[str, Any]]]] = [
        ("`mnistflow train` (fast preset, tracking on)", COMMAND, []),
        ("reference CNN, 1 epoch (`reference_cnn.py`)", REFERENCE, []),
    ]
    if args.fp32:
        label = "`mnistflow train --precision fp32`"
        sides.append((label, [*COMMAND, "--precision", "fp32"], []))
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-command-") as tmp:
        folder = Path(tmp)
        # Untimed: creates ./mlflow.db (schema migrations happen once per store) and warms the
        # file cache and the interpreter's .pyc files for every side.
        for _, argv, _ in sides:
            run(argv, folder)
        for i in range(args.rounds):
            # The order rotates, so no side always runs first (on the coolest machine).
            for label, argv, results in rotated(sides, i):
                results.append(run([*argv, "--seed", str(i)], folder))
                r = results[-1]
                print(
                    f"round {i}: {label[:40]:40s} train {r['train_seconds']:5.2f} s, "
                    f"wall {r['wall_seconds']:5.2f} s, test accuracy {r['test_accuracy']:.2%}",
                    flush=True,
                )
    load_after = os.getloadavg()

    def series(results: list[dict[str, Any]], key: str) -> list[float]:
        return [float(r[key]) for r in results]

    command, reference = sides[0][2], sides[1][2]
    ratios = [
        c["train_seconds"] / r["train_seconds"] for c, r in zip(command, reference, strict=True)
    ]
    ratio = statistics.median(series(command, "train_seconds")) / statistics.median(
        series(reference, "train_seconds")
    )
    rows = [
        [
            label,
            spread(series(results, "train_seconds")),
            spread(series(results, "wall_seconds")),
            percent(series(results, "test_accuracy")),
        ]
        for label, _, results in sides
    ]
    rows[0][1] = f"**{rows[0][1]}**"
    print()
    print(
        table(
            ["", "train_seconds, median (min-max)", "wall time", "test accuracy"],
            rows,
        )
    )
    print(
        f"\ncommand / reference training time: {ratio:.2f}x (ratio of medians; per round "
        f"{spread(ratios, 'x', 2)}), {args.rounds} interleaved rounds, load average "
        f"{load_before[0]:.1f} before and {load_after[0]:.1f} after."
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "command.json").write_text(
        json.dumps(
            {
                "sides": {label: results for label, _, results in sides},
                "ratio_of_medians": ratio,
                "ratios_per_round": ratios,
                "load_average_before_after": [load_before, load_after],
                "cpu_count": os.cpu_count(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
