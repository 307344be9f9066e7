"""`mnistflow sync`: the runs still waiting in the spool, sent to their stores, one copier
per run at a time (a lock the OS releases when its holder dies)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from mnistflow.config import FAILURE_TAG
from mnistflow.spool.copier import RunCopier, SyncResult
from mnistflow.spool.targets import (
    DONE,
    REMOTE_RUN,
    TARGET,
    connect_uri,
    quiet_store_errors,
    recorded_target,
    short_requests,
    spool_uri,
    why_not_sent,
)
from mnistflow.store.uris import spool_dir, sqlite_path


def pending(folder: Path | None = None) -> list[Any]:
    """Spool runs not yet completely on their server (finished ones, and running ones:
    written now, or left by a writer that died)."""
    client = MlflowClient(spool_uri(folder))
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    runs = client.search_runs(experiments, max_results=50000)
    return [r for r in runs if TARGET in r.data.tags and r.data.tags.get(DONE) != "true"]


# -- one copier per run: its lock ---------------------------------------------------------

# A RUNNING spool run with no lock file younger than this is still starting (the lock is
# taken a moment after the run is made); older, its writer died before taking it.
STARTING_S = 60.0
# Why a dead writer's run ended, as its failure_reason.
DIED = (
    "The training process stopped without ending its run (killed, out of memory or a "
    "reboot); mnistflow sync sent what it had logged and ended the run FAILED."
)


def run_lock(spool_run_id: str, folder: Path | None = None) -> FileLock:
    """The lock of one spool run. The training process holds it from the run's start to the
    end of its final copy, and `mnistflow sync` while it copies the run: one copier per run
    at a time. The OS releases it when its holder dies, however it dies, so a RUNNING run
    whose lock is free was left by a writer that is gone."""
    locks = (folder or spool_dir()) / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    # filelock: flock on POSIX, and the same code on the other systems MLflow runs on.
    return FileLock(locks / f"{spool_run_id}.lock")


def sync(folder: Path | None = None, target: str | None = None) -> list[SyncResult]:
    """Send every pending spool run (for target, when given) to its target store. Each run's
    outcome is its own: one that cannot be sent is reported and the others go on. target may
    carry the login the spool does not keep (see recorded_target)."""
    with short_requests(timeout=60):
        quiet_store_errors()
        spool = MlflowClient(spool_uri(folder))
        wanted = recorded_target(target) if target else None
        results = []
        for run in pending(folder):
            if not wanted or run.data.tags[TARGET] == wanted:
                results.append(_sync_one(spool, run, folder, target))
        return results


def _starting(run: Any) -> bool:
    """A RUNNING run younger than STARTING_S, whose writer may not have taken its lock yet."""
    running = run.info.status == RunStatus.to_string(RunStatus.RUNNING)
    return running and bool(time.time() - run.info.start_time / 1000 < STARTING_S)


def _sync_one(spool: MlflowClient, run: Any, folder: Path | None, given: str | None) -> SyncResult:
    run_id, uri = run.info.run_id, run.data.tags[TARGET]
    waiting = SyncResult(run_id, uri, run.data.tags.get(REMOTE_RUN))
    lock = run_lock(run_id, folder)
    if not Path(lock.lock_file).exists() and _starting(run):
        # Checked before taking the lock: taking it creates the lock file, and a second sync
        # would then take this run's writer, still starting, for a dead one.
        waiting.error = "it is still running"
        return waiting
    try:
        lock.acquire(timeout=0)
    except Timeout:
        waiting.error = "its training process or another sync is sending it now"
        return waiting
    try:
        run = spool.get_run(run_id)  # again, under the lock
        if run.data.tags.get(DONE) == "true":
            return SyncResult(run_id, uri, run.data.tags.get(REMOTE_RUN), complete=True)
        note = None
        if run.info.status == RunStatus.to_string(RunStatus.RUNNING):
            # Nobody holds its lock: the process that wrote it is gone.
            spool.set_tag(run_id, FAILURE_TAG, DIED)
            spool.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
            note = DIED
        if gone := _gone(uri):
            waiting.error = gone
            return waiting
        copier = RunCopier(spool, connect_uri(uri, given), run_id)
        try:
            result = copier.finish()
        except Exception as e:
            waiting.remote_run_id = copier.remote_run_id or waiting.remote_run_id
            waiting.error = why_not_sent(e, uri, waiting.remote_run_id)
            waiting.note = note
            return waiting
        result.note = note
        return result
    finally:
        lock.release()


def _gone(target: str) -> str | None:
    """One sentence when an embedded target's folder no longer exists: sync makes no store
    in its place (one the user did not ask for); the run waits in the spool."""
    path = sqlite_path(target)
    if path is None or path.parent.is_dir():
        return None
    return (
        f"the folder of the MLflow store {target} no longer exists; create {path.parent} "
        "to send the run there"
    )
