"""What a tracking-server outage costs a training run: the fast preset's whole
`mnistflow train` against a local `mlflow server` that is up, paused for 20 s mid-run
(SIGSTOP: it accepts connections and answers nothing), or down throughout (the run is
spooled), interleaved, medians; and the time `mnistflow sync` takes to deliver one spooled run.
After each round it checks what arrived: the server's run must hold exactly what the run logged
(the spool's record: every metric point with its step, timestamp and value, system metrics
included), and the same values per step as the first fault-free run (same seed).

Usage: python benchmarks/bench_outage.py [--rounds 3] [--outage 20] [--limit-train N]
Prints the README's table and writes benchmarks/results/outage.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from common import BIN, RESULTS, table, tool_env
from mnistflow.stack import servers


class Server:
    """`mlflow server` on one port and store, started and stopped at will."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, servers.free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        args = [
            str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
            "--workers", "1", "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
            "--artifacts-destination", str(self.folder / "artifacts"),
        ]  # fmt: skip
        self.proc = servers.start(
            args, env=tool_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        servers.wait_until_up(f"{self.uri}/health", self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            servers.stop(self.proc)
            self.proc = None

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)

    def runs(self) -> int:
        client = MlflowClient(self.uri)
        experiment = client.get_experiment_by_name("mnist")
        return len(client.search_runs([experiment.experiment_id])) if experiment else 0


@contextlib.contextmanager
def spooling_server() -> Iterator[tuple[Server, dict[str, str]]]:
    """A started `mlflow server` in a temporary folder, and the environment whose spool is
    in that folder too; the server is stopped and the folder removed afterwards."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**tool_env(), "MNISTFLOW_SPOOL_DIR": f"{tmp}/spool"}
        server = Server(Path(tmp) / "server")
        server.folder.mkdir()
        server.start()
        try:
            yield server, env
        finally:
            server.stop()


def train(
    server: Server, extra: list[str], env: dict[str, str]
) -> tuple[subprocess.Popen[str], float]:
    args = [sys.executable, "-m", "mnistflow", "train", "--json", "--tracking-uri", server.uri]
    proc = subprocess.Popen(
        [*args, *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    return proc, time.perf_counter()


def outcome(proc: subprocess.Popen[str], started: float) -> dict[str, Any]:
    stdout, stderr = proc.communicate(timeout=1800)
    if proc.returncode not in (0, 75):  # 75: trained, kept in the spool
        raise RuntimeError(f"mnistflow train failed: {stderr[-2000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    return {**result, "wall_seconds": time.perf_counter() - started}


def one_round(
    server: Server, mode: str, outage: float, extra: list[str], env: dict[str, str]
) -> dict[str, Any]:
    if mode == "down":
        server.stop()
        proc, started = train(server, [*extra, "--wait-for-server", "0"], env)
        result = outcome(proc, started)
        server.start()
        began = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "mnistflow", "sync", "--json"],
            env=env, capture_output=True, text=True, timeout=1800,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"mnistflow sync failed: {done.stderr[-2000:]}")
        return {**result, "sync_seconds": time.perf_counter() - began}
    before = server.runs()
    proc, started = train(server, extra, env)
    if mode == "outage":
        while server.runs() == before:  # the run is on the server: training has begun
            time.sleep(0.2)
        server.signal(signal.SIGSTOP)
        time.sleep(outage)
        server.signal(signal.SIGCONT)
    return outcome(proc, started)


TIMING = {"train_seconds", "total_seconds", "epoch_seconds", "images_per_second"}


def histories(client: MlflowClient, run_id: str, exact: bool = True) -> dict[str, Any]:
    """Every metric's points as (step, timestamp, value); not exact: (step, value) of the
    metrics another run of the same seed repeats (no timings, no system metrics)."""
    out = {}
    for key in client.get_run(run_id).data.metrics:
        if not exact and (key.startswith("system/") or key in TIMING):
            continue
        points = client.get_metric_history(run_id, key)
        out[key] = sorted(
            (m.step, m.timestamp, m.value) if exact else (m.step, m.value) for m in points
        )
    return out


def arrived(server: Server, run_id: str, env: dict[str, str], reference: Any) -> bool:
    """Whether the server's run holds exactly what the run logged (the spool's record of it)
    and, after the first round, the reference's values per step."""
    from mnistflow.spool import targets

    client = MlflowClient(server.uri)
    spool_run = client.get_run(run_id).data.tags[targets.SPOOL_RUN]
    spooled = MlflowClient(targets.spool_uri(Path(env["MNISTFLOW_SPOOL_DIR"])))
    same = histories(client, run_id) == histories(spooled, spool_run)
    return same and (reference is None or histories(client, run_id, exact=False) == reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs per mode (default 3)")
    parser.add_argument("--outage", type=float, default=20, help="pause in seconds (20)")
    parser.add_argument("--limit-train", type=int, help="train on fewer images (a quick try)")
    args = parser.parse_args()
    extra = ["--limit-train", str(args.limit_train)] if args.limit_train else []
    modes = ["up", "outage", "down"]
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    reference: dict[str, Any] | None = None
    with spooling_server() as (server, env):
        for i in range(args.rounds):
            for mode in modes[i % 3 :] + modes[: i % 3]:  # each mode takes each position
                r = one_round(server, mode, args.outage, extra, env)
                r["arrived"] = arrived(server, r["run_id"], env, reference)
                if reference is None:
                    reference = histories(MlflowClient(server.uri), r["run_id"], exact=False)
                results[mode].append(r)
                print(
                    f"round {i} {mode:7s} train {r['train_seconds']:.2f} s, whole "
                    f"{r['wall_seconds']:.1f} s, spooled {r['spooled']}"
                    + (f", sync {r['sync_seconds']:.1f} s" if "sync_seconds" in r else "")
                    + f", arrived exactly: {r['arrived']}",
                    flush=True,
                )

    def cell(values: list[float], unit: str = "s") -> str:
        return f"{statistics.median(values):.2f} {unit} ({min(values):.2f}-{max(values):.2f})"

    names = {
        "up": "server up",
        "outage": f"server paused {args.outage:.0f} s mid-run",
        "down": "server down throughout (spooled)",
    }
    rows = [
        [
            names[m],
            cell([r["train_seconds"] for r in results[m]]),
            cell([r["wall_seconds"] for r in results[m]]),
            "no" if all(not r["spooled"] for r in results[m]) else "yes",
            f"{sum(r['arrived'] for r in results[m])}/{len(results[m])}",
        ]
        for m in modes
    ]
    print(
        table(
            [
                "tracking server",
                "train time, median (min-max)",
                "whole command",
                "spooled",
                "arrived exactly",
            ],
            rows,
        )
    )
    sync_seconds = [r["sync_seconds"] for r in results["down"]]
    print(f"\n`mnistflow sync` of one spooled run: {cell(sync_seconds)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "outage.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
