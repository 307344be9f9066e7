"""A randomized soak of "nothing lost": real `mnistflow train` commands against a real
`mlflow server` on loopback, each hit by one fault at a random moment and of a random length
(shorter or longer than the spool's request timeout): the server paused (SIGSTOP), killed
and restarted on the same store, down (connections refused), a proxy in front of it that
stalls or answers slowly, the training process killed, or `mnistflow sync` killed half-way.
After each, `mnistflow sync` is run until nothing waits, and the server's run must hold
exactly what the run logged (the spool's record: every metric point with its step, timestamp
and value, system metrics included; params; the model READY; the registration, once) and
the same metric values per step as a fault-free run of the same seed.

Seeded: `--seed S` replays the same schedules. Prints how many schedules ran and matched.

Usage: python benchmarks/soak_spool.py [--schedules 12] [--seed 0] [--limit-train 4000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient

from bench_outage import Server, histories, spooling_server
from common import RESULTS
from mnistflow.spool import targets

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from spool_faults import StallingProxy

FAULTS = ("pause", "restart", "down", "stall", "slow", "kill-train", "kill-sync")


def train(uri: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "mnistflow", "train", "--json", "--tracking-uri", uri, *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


def sync(env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "mnistflow", "sync", "--json"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


def one(
    server: Server, fault: str, at_s: float, length_s: float, train_args: list[str], env: dict
) -> tuple[str, str]:
    """One schedule: (the server run's id, what the training command ended with)."""
    proxy = None
    uri = server.uri
    if fault in ("stall", "slow"):
        proxy = StallingProxy(server.port)
        proxy.start()
        uri = f"http://127.0.0.1:{proxy.port}"
    before = len(spool_runs(env))
    proc = train(uri, [*train_args, "--wait-for-server", "10"], env)
    while len(spool_runs(env)) == before and proc.poll() is None:
        time.sleep(0.2)  # the run has started (in the spool): the fault comes mid-run
    time.sleep(at_s)
    try:
        if fault == "pause":
            server.signal(signal.SIGSTOP)
            time.sleep(length_s)
            server.signal(signal.SIGCONT)
        elif fault in ("restart", "down"):
            server.stop()
            time.sleep(length_s if fault == "down" else 1)
            server.start()
        elif fault in ("stall", "slow") and proxy is not None:
            proxy.mode = fault
            time.sleep(length_s)
            proxy.mode = "pass"
        elif fault == "kill-train":
            os.killpg(proc.pid, signal.SIGKILL)
        ended = proc.communicate(timeout=900)
        if fault == "kill-sync":
            first = sync(env)
            time.sleep(length_s / 10)
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    finally:
        if proxy is not None:
            proxy.stop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    for _ in range(3):  # until nothing waits
        done = subprocess.run(
            [sys.executable, "-m", "mnistflow", "sync", "--json"],
            env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        if done.returncode == 0:
            break
    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name("mnist")
    runs = client.search_runs([experiment.experiment_id], order_by=["start_time DESC"])
    return runs[0].info.run_id, f"exit {proc.returncode}: {ended[1].strip()[-200:]}"


def spool_runs(env: dict) -> list[str]:
    client = MlflowClient(targets.spool_uri(Path(env["MNISTFLOW_SPOOL_DIR"])))
    experiments = [e.experiment_id for e in client.search_experiments()]
    return [r.info.run_id for r in client.search_runs(experiments)] if experiments else []


def check(server: Server, run_id: str, reference: dict, env: dict, killed: bool) -> list[str]:
    """What differs from what the run logged (the spool's record) and from the reference."""
    problems = []
    client = MlflowClient(server.uri)
    run = client.get_run(run_id)
    spooled = MlflowClient(targets.spool_uri(Path(env["MNISTFLOW_SPOOL_DIR"])))
    spool_run_id = run.data.tags[targets.SPOOL_RUN]
    if histories(client, run_id) != histories(spooled, spool_run_id):
        problems.append("metric histories differ from the spool's")
    if run.data.params != spooled.get_run(spool_run_id).data.params:
        problems.append("params differ")
    if not killed:
        if run.info.status != "FINISHED":
            problems.append(f"status {run.info.status}")
        if histories(client, run_id, exact=False) != reference:
            problems.append("metric values differ from the fault-free run's")
        models = client.search_logged_models(
            [run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'"
        )
        found = sorted((m.name, m.status == LoggedModelStatus.READY) for m in models)
        if found != [("model", True), ("pytorch", True)]:
            problems.append(f"models {found}")
        versions = client.search_model_versions(f"name='mnist' AND run_id='{run_id}'")
        if len(versions) != 1:
            problems.append(f"{len(versions)} registered versions")
    pending = subprocess.run(
        [sys.executable, "-m", "mnistflow", "sync", "--list", "--json"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if json.loads(pending.stdout.strip().splitlines()[-1])["pending"]:
        problems.append("runs still wait in the spool")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--schedules", type=int, default=12, help="fault schedules (12)")
    parser.add_argument("--seed", type=int, default=0, help="replays the same schedules (0)")
    parser.add_argument("--limit-train", type=int, default=4000, help="images (4000)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    train_args = [
        "--limit-train", str(args.limit_train), "--epochs", "3", "--seed", "3", "--register",
    ]  # fmt: skip
    outcomes = []
    with spooling_server() as (server, env):
        reference_id, _ = one(server, "none", 0, 0, train_args, env)
        reference = histories(MlflowClient(server.uri), reference_id, exact=False)
        for i in range(args.schedules):
            fault = FAULTS[i % len(FAULTS)] if i < len(FAULTS) else rng.choice(FAULTS)
            at_s = rng.uniform(0, 8)
            length_s = rng.uniform(2, 3 * targets.REQUEST_TIMEOUT_S)
            run_id, ended = one(server, fault, at_s, length_s, train_args, env)
            problems = check(server, run_id, reference, env, killed=fault == "kill-train")
            outcomes.append(
                {"fault": fault, "at_s": round(at_s, 1), "length_s": round(length_s, 1),
                 "matched": not problems, "problems": problems, "train": ended}
            )  # fmt: skip
            print(
                f"{i:3d} {fault:10s} at {at_s:5.1f} s for {length_s:5.1f} s: "
                + ("matched" if not problems else "; ".join(problems)),
                flush=True,
            )
    matched = sum(o["matched"] for o in outcomes)
    print(f"\n{len(outcomes)} fault schedules (seed {args.seed}), {matched} matched exactly.")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "soak_spool.json").write_text(json.dumps(outcomes, indent=1))
    if matched != len(outcomes):
        sys.exit(1)


if __name__ == "__main__":
    main()
