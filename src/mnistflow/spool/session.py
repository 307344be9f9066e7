"""One training run spooled for its target store: opened before the run, finished after."""

from __future__ import annotations

import logging
import tempfile
import time

from filelock import FileLock
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from mnistflow.config import FAILURE_TAG, MnistflowError
from mnistflow.spool.copier import RunCopier, SyncResult, local_folder
from mnistflow.spool.forwarder import Forwarder, finish_with_deadline
from mnistflow.spool.sync import run_lock
from mnistflow.spool.targets import (
    DONE,
    FORWARD_INTERVAL_EMBEDDED_S,
    FORWARD_INTERVAL_S,
    REGISTER_AS,
    REMOTE_RUN,
    TARGET,
    open_target,
    outage_reason,
    quiet_store_errors,
    recorded_target,
    short_requests,
    spool_uri,
)
from mnistflow.store import checks, remote
from mnistflow.store.uris import is_embedded, target_uri

log = logging.getLogger(__name__)


class Session:
    """One training run spooled for its target store: opened before the run, finished after.

    session = Session(target, require_server)    # checks the target (or warns)
    ... start the run in the spool store (session.uri), then session.attach(run_id)
    ... train; the forwarder copies as it goes
    result = session.finish(deadline_s)          # after the spool run has ended
    """

    def __init__(self, target: str, require_server: bool = False) -> None:
        self.target = target_uri(target)
        self.embedded = is_embedded(self.target)
        self.uri = ""  # the spool's, once the target is checked (a refusal makes nothing)
        self.copier: RunCopier | None = None
        self.forwarder: Forwarder | None = None
        self.server_up = True  # the target takes writes (a server answers, a store is writable)
        self.lock: FileLock | None = None
        self._closed = False
        self._requests = short_requests()
        self._requests.__enter__()
        if self.embedded:
            quiet_store_errors()
        try:
            # Wrong credentials, a server that is not MLflow, or a store folder that does not
            # exist are not outages: they stop here.
            if self.embedded:
                checks.check_writable(self.target)
            else:
                checks.check_reachable(self.target)
        except checks.StoreUnavailable as e:
            if require_server:
                self._requests.__exit__(None, None, None)
                raise
            self.server_up = False
            unavailable = e
        except MnistflowError:
            self._requests.__exit__(None, None, None)
            raise
        self.uri = spool_uri()
        if not self.server_up:
            log.warning(
                "%s Training goes on into the local spool (%s), to be sent %s.",
                unavailable, self.uri, remote.send_later(self.target),
            )  # fmt: skip

    def experiment_of(self, remote_run_id: str) -> str:
        """The name of the target's experiment that holds remote_run_id."""
        client = open_target(self.target)
        run = client.get_run(remote_run_id)
        return str(client.get_experiment(run.info.experiment_id).name)

    def attach(self, spool_run_id: str, remote_run_id: str | None = None) -> None:
        """Start copying spool_run_id; remote_run_id: a target run it completes (an MLflow
        Project's), instead of one found or created by the copy."""
        # Held until the final copy is through: `mnistflow sync` leaves the run alone meanwhile,
        # and takes it over should this process die.
        self.lock = run_lock(spool_run_id)
        self.lock.acquire(timeout=0)
        spool = MlflowClient(self.uri)
        spool.set_tag(spool_run_id, TARGET, recorded_target(self.target))
        if remote_run_id:
            spool.set_tag(spool_run_id, REMOTE_RUN, remote_run_id)
        self.copier = RunCopier(spool, self.target, spool_run_id)
        # Copying into a local store is work for this process's 2 cores, not a wait on a
        # network: see FORWARD_INTERVAL_EMBEDDED_S.
        interval = FORWARD_INTERVAL_EMBEDDED_S if self.embedded else FORWARD_INTERVAL_S
        self.forwarder = Forwarder(self.copier, interval)
        if not self.server_up:
            self.forwarder.outage_since = time.monotonic()  # said once, in __init__
        # The target's run exists from the start, so the UI shows it while it trains.
        if self.server_up and self.forwarder.step() and self.embedded:
            self._check_artifacts()
        self.forwarder.start()

    def _check_artifacts(self) -> None:
        """Before training: the target run's artifact folder takes files. One that cannot for
        a reason no waiting mends (a file in its place) fails the run now, with why, as the
        first artifact did when runs were written directly; a full disk is an outage."""
        assert self.copier is not None and self.copier.remote_run_id is not None
        run_id = self.copier.remote_run_id
        artifact_uri = self.copier.remote.get_run(run_id).info.artifact_uri
        folder = local_folder(artifact_uri)
        if folder is None:
            return
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as e:
            if remote.is_outage(e):
                log.warning("%s The run goes on in the spool.", outage_reason(e, self.target))
                return
            reason = (
                f"Cannot write artifacts to {artifact_uri} ({e}); make it writable or set "
                "another artifact location for the experiment."
            )
            self.copier.remote.set_tag(run_id, FAILURE_TAG, f"MnistflowError: {reason}")
            self.copier.remote.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
            # Nothing of this run is left to send.
            self.copier.spool.set_tag(self.copier.spool_run_id, DONE, "true")
            self.close()
            raise MnistflowError(reason) from e

    def register_as(self, name: str) -> None:
        """Register the run's model under name once it is on the target."""
        assert self.copier is not None
        self.copier.spool.set_tag(self.copier.spool_run_id, REGISTER_AS, name)

    @property
    def remote_run_id(self) -> str | None:
        return self.copier.remote_run_id if self.copier else None

    def finish(self, deadline_s: float) -> SyncResult:
        """Stop the forwarder and copy the ended run, trying for up to deadline_s."""
        if self.embedded:
            # A full disk or a permission does not mend itself in the minute a restarting
            # server takes: one try; the run waits in the spool for `mnistflow sync`.
            deadline_s = 0
        try:
            assert self.copier is not None and self.forwarder is not None
            self.forwarder.stop()
            if self.forwarder.refused:
                raise MnistflowError(self.forwarder.refused)
            return finish_with_deadline(self.copier, deadline_s)
        finally:
            self.close()

    def close(self) -> None:
        """Requests back to MLflow's settings, and the run's lock released (once)."""
        if self._closed:
            return
        self._closed = True
        self._requests.__exit__(None, None, None)
        if self.lock is not None:
            self.lock.release()
