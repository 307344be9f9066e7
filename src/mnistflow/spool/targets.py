"""The spool store and the stores its runs go to: where each is, the tags that tie a
spool run to its target, the clients and request settings a copy uses, and one sentence
for each way a copy can fail."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mnistflow.config import MnistflowError
from mnistflow.store import checks, remote
from mnistflow.store.uris import (
    is_embedded,
    is_remote,
    is_spool,
    redact,
    spool_dir,
    sqlite_path,
    target_uri,
)

log = logging.getLogger(__name__)

# Tags on spool runs (never copied to the server).
BOOKKEEPING = "mnistflow.sync."
TARGET = "mnistflow.sync.target"  # the tracking URI the run belongs to
REMOTE_RUN = "mnistflow.sync.remote_run_id"  # its run on the server, once there is one
DONE = "mnistflow.sync.done"  # "true" once the whole run is on the server
REGISTER_AS = "mnistflow.sync.register_as"  # the model name `--register` asked for
REGISTERED = "mnistflow.sync.registered_version"
# Tags on the server's runs and models: where they came from (how a repeat finds them).
SPOOL_RUN = "mnistflow.spool_run_id"
SPOOL_MODEL = "mnistflow.spool_model_id"
# The tags MLflow sets on a run from where it was started (see push_run_data).
CONTEXT = ("mlflow.source.", "mlflow.user", "mlflow.project.")
# The end of the failure reason a target's run gets while its copy waits (see _mark_failed).
KEPT = "The run is kept in the local spool; `mnistflow sync` completes it."

# How long one request to the server may take while spooling; MLflow's own default
# (120 s, with retries) would hold the forwarder for minutes on a hung server.
REQUEST_TIMEOUT_S = 10
# Seconds between the forwarder's copies: a server's UI shows the run 2 s behind training.
FORWARD_INTERVAL_S = 2.0
# Into an embedded store a copy round is this process's own work (about 0.15 s, reading the
# spool and writing the store), competing with training for the GIL and 2 cores, where a
# server's is mostly waiting on the network: every 2 s it slowed full-MNIST training by
# 0.3-0.9 s of 4.5-6 s (5 interleaved rounds, each slower). Every 10 s the local UI still
# shows a live run and the cost is lost in the noise.
FORWARD_INTERVAL_EMBEDDED_S = 10.0


def spool_uri(folder: Path | None = None) -> str:
    """The spool store's URI; the store is made (whole) when it does not exist yet."""
    folder = folder or spool_dir()
    path = folder.resolve() / "spool.db"
    uri = f"sqlite:///{path}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            checks.create_sqlite_store(path)
    except Exception as e:
        if reason := remote.store_sentence(e, uri):
            raise MnistflowError(reason) from e
        raise
    return uri


def spools(uri: str) -> bool:
    """Whether a run for uri goes through the spool: runs for a tracking server or an
    embedded store do, so one code path (autolog, artifacts and models included) survives
    either going away; the spool itself and other databases are written directly."""
    return is_remote(uri) or (is_embedded(uri) and not is_spool(uri))


def recorded_target(uri: str) -> str:
    """uri as the spool records it (its TARGET tag): target_uri's, without a password or a
    token (see uris.redact): the spool keeps no secret. `mnistflow sync` logs in again with
    MLFLOW_TRACKING_USERNAME/PASSWORD, or with the whole URI given to --tracking-uri."""
    return redact(target_uri(uri))


def connect_uri(recorded: str, given: str | None = None) -> str:
    """The URI sync connects to for a run recorded for `recorded`: the one given (its login
    included) when it is that store, else the recorded one without its hidden login, so that
    MLflow's own credentials (MLFLOW_TRACKING_USERNAME/PASSWORD) apply."""
    if given and recorded_target(given) == recorded:
        return target_uri(given)
    return re.sub(r"//[^/@\s]*:\*\*\*@", "//", recorded)


def open_target(target: str) -> MlflowClient:
    """A client of target. An embedded store is checked first (StoreUnwritable when it cannot
    be written) and made whole when it does not exist: MlflowClient would create it on the
    spot, step by step, and a full disk would leave it half-made."""
    path = sqlite_path(target)
    if path is not None:
        checks.check_writable(target)
        if not path.exists():
            checks.create_sqlite_store(path)
    return MlflowClient(target, registry_uri=target)


def outage_reason(error: BaseException, target: str) -> str:
    """One sentence for an outage of target (see remote.is_outage)."""
    if is_embedded(target):
        return remote.store_sentence(error, target) or f"The MLflow store {target} failed: {error}"
    return redact(
        remote.sentence(error, target)
        or f"The tracking server at {target} did not answer ({type(error).__name__})."
    )


class _HandledStoreErrors(logging.Filter):
    """Drops MLflow's own log of a SQLite error that is an unwritable store (it logs each
    with its traceback, then raises it): we say it once, in one sentence."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        errors = [a for a in args if isinstance(a, BaseException)]
        if record.exc_info and record.exc_info[1] is not None:
            errors.append(record.exc_info[1])
        return not any(remote.unwritable(e) for e in errors)


def quiet_store_errors() -> None:
    """Install _HandledStoreErrors on MLflow's database logger (once per process)."""
    logger = logging.getLogger("mlflow.store.db.utils")
    if not any(isinstance(f, _HandledStoreErrors) for f in logger.filters):
        logger.addFilter(_HandledStoreErrors())


def auth_problem(error: BaseException, target: str) -> str | None:
    """One sentence when the server refused our login (not an outage: retrying won't help)."""
    if not remote.is_login_refused(error):
        return None
    return remote.sentence(error, target)


@contextlib.contextmanager
def short_requests(timeout: int = REQUEST_TIMEOUT_S) -> Iterator[None]:
    """Requests to the server fail fast (we retry on our own schedule, not MLflow's)."""
    settings = {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        # Copying a model's files is no download a person waits on: no progress bars.
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def why_not_sent(error: BaseException, target: str, remote_run_id: str | None) -> str:
    """One sentence for a copy that failed: an outage, a refused login, or a refusal of the
    run itself (deleted or archived in the UI, its experiment gone, a bad request)."""
    return redact(_why_not_sent(error, target, remote_run_id))


def _why_not_sent(error: BaseException, target: str, remote_run_id: str | None) -> str:
    log.debug("copying to %s failed", redact(target), exc_info=error)
    if problem := auth_problem(error, target):
        return problem
    if remote.is_outage(error):
        if is_embedded(target):
            return outage_reason(error, target)
        return f"the tracking server at {target} did not answer"
    if isinstance(error, MnistflowError):
        return str(error)
    message = error.message if isinstance(error, MlflowException) else str(error)
    message = message.strip().splitlines()[0] if message.strip() else type(error).__name__
    if remote_run_id and ("deleted" in message or "active" in message):
        return (
            f"{target} refuses run {remote_run_id}: it or its experiment was deleted "
            f"({message}); restore it in the MLflow UI, then run mnistflow sync again."
        )
    return f"{target} refused the run's copy: {message}"
