"""Copying while a run trains (the forwarder thread), and the final copy at the end of a
command, with its deadline."""

from __future__ import annotations

import logging
import threading
import time

from mnistflow.config import FAILURE_TAG, MnistflowError
from mnistflow.spool.copier import CopyIncomplete, RunCopier, SyncResult
from mnistflow.spool.targets import (
    FORWARD_INTERVAL_S,
    KEPT,
    auth_problem,
    outage_reason,
    why_not_sent,
)
from mnistflow.store import remote
from mnistflow.store.uris import is_embedded, redact

log = logging.getLogger(__name__)


class Forwarder(threading.Thread):
    """Copies a run's params, tags and metrics to its target while it trains, every few
    seconds; an outage only postpones the next copy. Never raises into training."""

    def __init__(self, copier: RunCopier, interval: float = FORWARD_INTERVAL_S) -> None:
        super().__init__(name="mnistflow-forwarder", daemon=True)
        self.copier = copier
        self.interval = interval
        self.stopping = threading.Event()
        self.outage_since: float | None = None
        self.refused: str | None = None  # credentials refused: stop trying

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            self.step()

    def step(self) -> bool:
        """One copy; True when the server took it."""
        if self.refused:
            return False
        target = self.copier.target
        try:
            self.copier.push_run_data()
        except Exception as e:
            self.refused = auth_problem(e, target)
            outage = remote.is_outage(e)
            if self.refused is None and not outage:
                log.warning(
                    "copying run %s to %s failed: %s",
                    self.copier.spool_run_id, redact(target), redact(str(e)),
                )  # fmt: skip
            if self.outage_since is None:
                self.outage_since = time.monotonic()
                if not is_embedded(target):
                    log.warning(
                        "the tracking server is not answering; the run goes on in the spool"
                    )
                elif outage:
                    log.warning("%s The run goes on in the spool.", outage_reason(e, target))
            return False
        if self.outage_since is not None:
            log.warning(
                "%s takes writes again after %.0f s; catching up",
                "the MLflow store" if is_embedded(target) else "the tracking server",
                time.monotonic() - self.outage_since,
            )
            self.outage_since = None
        return True

    def stop(self) -> None:
        self.stopping.set()
        self.join()


def finish_with_deadline(copier: RunCopier, deadline_s: float) -> SyncResult:
    """The final copy at the end of a command: try until it works or deadline_s pass. A
    refusal of the run itself is not waited on: the run stays in the spool, with why."""
    end = time.monotonic() + deadline_s
    target = copier.target
    while True:
        try:
            return copier.finish()
        except Exception as e:
            problem = auth_problem(e, target)
            if problem:
                raise MnistflowError(problem) from e
            last = e
            if not (remote.is_outage(e) or isinstance(e, CopyIncomplete)):
                break
        if time.monotonic() >= end:
            break
        time.sleep(2)
    reason = why_not_sent(last, target, copier.remote_run_id)
    if remote.is_outage(last):
        reason = outage_reason(last, target)
    _mark_failed(copier, reason)
    return SyncResult(copier.spool_run_id, redact(target), copier.remote_run_id, error=reason)


def _mark_failed(copier: RunCopier, reason: str) -> None:
    """Where the server can still record it, its run is not left RUNNING: FAILED, with why
    (a later `mnistflow sync` completes it and ends it as the spool's run ended)."""
    if copier.remote_run_id is None:
        return
    why = f"{reason} {KEPT}"
    # Three tries: a server that reset the connection of a failed upload resets the next
    # request on that kept-alive connection too; a new one goes through.
    for attempt in range(3):
        try:
            copier.remote.set_tag(copier.remote_run_id, FAILURE_TAG, why)
            copier.remote.set_terminated(copier.remote_run_id, "FAILED")
            return
        except Exception as e:  # the store may be away altogether
            if remote.is_outage(e) and is_embedded(copier.target):
                return  # a full or read-only store: the sentence above said it already
            if attempt == 2:
                log.warning(
                    "could not mark run %s FAILED: %s", copier.remote_run_id, redact(str(e))
                )
