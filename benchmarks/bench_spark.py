"""Batch inference on Spark against one process, in one run: images per second and peak memory
of the whole command (start-up, model load, reading, scoring and writing included).

- `mnistflow predict digits.parquet --engine spark --master local[2] --output out.parquet`
- `mnistflow predict digits.npy --output out.csv` (the local path, one process)

on the same digits at 10k, 100k and 1M rows (the MNIST test set repeated; a Parquet dataset of
uint8 pixel arrays for Spark, the same array as .npy for the local path, which does not read
Parquet). Rounds alternate the order of the two commands; the labels of the two are compared
row for row. Peak memory is the largest sum of the resident memory of the command's whole
process tree (for Spark: the JVM and its Python workers), sampled every 0.1 s.

Usage: python benchmarks/bench_spark.py [--rows 10000 100000 1000000] [--rounds 3 2 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from bench_inference import registered_champion
from common import BIN, RESULTS, rotated, table, tool_env
from mnistflow import data
from mnistflow.config import DataConfig

CHUNK = 100_000  # rows per Parquet file


def write_inputs(pixels: np.ndarray, rows: int, folder: Path) -> tuple[Path, Path]:
    """The test set repeated to rows digits: a Parquet folder and a .npy of the same digits."""
    flat = pixels.reshape(len(pixels), 784)
    dataset = folder / f"digits-{rows}.parquet"
    dataset.mkdir()
    for start in range(0, rows, CHUNK):
        count = min(CHUNK, rows - start)
        chunk = flat[np.arange(start, start + count) % len(flat)]
        offsets = pa.array(np.arange(0, count * 784 + 1, 784, dtype=np.int32))
        column = pa.ListArray.from_arrays(offsets, pa.array(chunk.ravel()))
        pq.write_table(pa.table({"pixels": column}), dataset / f"part-{start // CHUNK:04d}.parquet")
    array = folder / f"digits-{rows}.npy"
    np.save(array, pixels[np.arange(rows) % len(pixels)])
    return dataset, array


def run_measured(args: list[str], uri: str, cwd: Path) -> tuple[float, float]:
    """Wall seconds and peak resident bytes of the command's whole process tree."""
    peak = 0
    started = time.perf_counter()
    proc = subprocess.Popen(
        args,
        env=tool_env(MLFLOW_TRACKING_URI=uri),
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            total = 0
            with contextlib.suppress(psutil.Error):
                for p in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        total += p.memory_info().rss
            peak = max(peak, total)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = proc.communicate()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}):\n{stderr}")
    return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--rounds", type=int, nargs="+", default=[3, 2, 1])
    args = parser.parse_args()
    pixels = data.load(DataConfig()).test.images[:, 0].numpy()  # (10000, 28, 28) uint8
    results: dict[str, Any] = {"load_average_before": list(psutil.getloadavg())}
    table_rows = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        folder = Path(tmp)
        uri = registered_champion(folder)
        for rows, rounds in zip(args.rows, args.rounds, strict=True):
            dataset, array = write_inputs(pixels, rows, folder)
            spark_out, local_out = folder / f"out-{rows}.parquet", folder / f"out-{rows}.csv"
            commands = {
                "spark local[2]": [
                    str(BIN / "mnistflow"), "predict", str(dataset), "--engine", "spark",
                    "--master", "local[2]", "--output", str(spark_out),
                ],
                "one process": [
                    str(BIN / "mnistflow"), "predict", str(array), "--output", str(local_out),
                ],
            }  # fmt: skip
            measured: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
            for round_ in range(rounds):
                for name in rotated(list(commands), round_):
                    if name.startswith("spark"):
                        subprocess.run(["rm", "-rf", str(spark_out)], check=True)
                    measured[name].append(run_measured(commands[name], uri, folder))
                    print(f"{rows:>9,} {name}: {measured[name][-1][0]:.1f} s", flush=True)
            # The same digits, row for row (Spark's rows are file[i]; files hold CHUNK rows).
            ours = pd.read_parquet(spark_out, columns=["source", "label"])
            part = ours["source"].str.extract(r"part-(\d+)\.parquet\[(\d+)\]$").astype(int)
            order = (part[0] * CHUNK + part[1]).to_numpy()
            spark_labels = np.empty(rows, np.int64)
            spark_labels[order] = ours["label"].to_numpy()
            local_labels = pd.read_csv(local_out, usecols=["label"])["label"].to_numpy()
            assert np.array_equal(spark_labels, local_labels), "Spark and local disagree"
            for name, runs in measured.items():
                seconds = statistics.median(s for s, _ in runs)
                peak = max(p for _, p in runs)
                results[f"{name} {rows}"] = {"seconds": [s for s, _ in runs], "peak_bytes": peak}
                table_rows.append(
                    [
                        f"{rows:,}",
                        name,
                        f"{seconds:.1f} s" + (f" ({len(runs)} runs)" if len(runs) > 1 else ""),
                        f"{rows / seconds:,.0f}",
                        f"{peak / 2**30:.1f} GiB",
                    ]
                )
            spark_rate = rows / statistics.median(s for s, _ in measured["spark local[2]"])
            local_rate = rows / statistics.median(s for s, _ in measured["one process"])
            table_rows.append(["", "Spark / one process", "", f"{spark_rate / local_rate:.0%}", ""])
            subprocess.run(["rm", "-rf", str(dataset), str(array)], check=True)
            print(table(["rows", "command", "wall time (median)", "images/s", "peak"], table_rows))
    results["load_average_after"] = list(psutil.getloadavg())
    print(table(["rows", "command", "wall time (median)", "images/s", "peak memory"], table_rows))
    print(f"load average before/after: {results['load_average_before']} / "
          f"{results['load_average_after']}")  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "spark.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
