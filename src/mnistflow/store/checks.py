"""Whether a tracking store can be used now: reachable, answering as MLflow, writable.

Before a run starts, use_store checks the store is the one asked for and usable (an MLflow
server that answers as one, a SQLite file that exists unless it is to be created); an
outage (StoreUnavailable) is told apart from a refusal (MnistflowError), because a training
run waits out the first in the local spool and stops on the second.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sqlite3
import tempfile
import uuid
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from mnistflow.config import DataConfig, MnistflowError
from mnistflow.store import remote
from mnistflow.store.uris import redact, sqlite_path


def resolve_tracking_uri(uri: str | None) -> str:
    """The tracking URI in force: the given one, else MLFLOW_TRACKING_URI, else MLflow's default."""
    if uri:
        mlflow.set_tracking_uri(uri)
    return str(mlflow.get_tracking_uri())


def check_reachable(uri: str) -> None:
    """Fail fast with one sentence when the store cannot be used, instead of minutes of retries.

    A tracking server passes only when it answers as MLflow's does: /health says "OK" (no
    login needed) and /version gives a version number (a login is, on an auth server).
    """
    path = sqlite_path(uri)
    if uri.startswith(("http://", "https://")):
        _check_server(uri)
    elif path is not None:
        folder = path.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise MnistflowError(
                f"Cannot create the MLflow store {redact(uri)}: {folder} is not a writable folder."
            )


class StoreUnavailable(MnistflowError):
    """The store cannot take writes now but may later: an outage, not a refusal."""


class ServerUnavailable(StoreUnavailable):
    """The tracking server did not answer, or answered 5xx."""


class StoreUnwritable(StoreUnavailable):
    """An embedded store's disk is full, or it is read-only or not ours to write."""


# What the writability check writes (and removes): about a spool round of metrics.
PROBE_BYTES = 64 * 1024


def check_writable(uri: str) -> None:
    """For a SQLite store: one sentence when its folder does not exist (a wrong URI), and
    StoreUnwritable when it cannot be written now (disk full, read-only, no permission).

    It writes, because nothing else tells: os.access says yes to root and knows nothing of
    free space. The probe is an unnamed file (O_TMPFILE), so nothing is left behind.
    """
    path = sqlite_path(uri)
    if path is None:
        return
    if not path.parent.is_dir():
        raise MnistflowError(
            f"Cannot create the MLflow store {redact(uri)}: {path.parent} is not a writable folder."
        )
    try:
        if path.exists():
            with path.open("r+b"):  # a read-only file or file system refuses this
                pass
        with tempfile.TemporaryFile(dir=path.parent) as probe:
            probe.write(bytes(PROBE_BYTES))
            probe.flush()
    except OSError as e:
        cause = OSError(e.errno, e.strerror)  # without the probe's own (random) file name
        reason = remote.store_sentence(cause, uri)
        if reason is None:
            raise MnistflowError(
                f"Cannot write the MLflow store {redact(uri)}: {e.strerror}."
            ) from e
        raise StoreUnwritable(reason) from cause


def create_sqlite_store(path: Path) -> None:
    """A new, empty SQLite MLflow store at path, whole or not at all.

    MLflow creates its tables step by step, so a disk that fills (or a second process that
    starts at the same moment) can leave a half-made store that no later command can open.
    Here it is made under a temporary name beside path and linked into place; when another
    process got there first, its store is as good. Experiment 0 keeps its artifacts beside
    the database, as create_experiment does for ours.
    """
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    making = path.with_name(f".{path.name}.{uuid.uuid4().hex}.making")
    try:
        template = empty_store_template()
        if template is not None:
            try:
                shutil.copyfile(template, making)
            except OSError as e:  # said without the template's and the temporary file's names
                raise OSError(e.errno, e.strerror) from None
        # On the template's tables MLflow only adds experiment 0 (with its artifact location
        # for this store); without a template it creates every table first.
        store = SqlAlchemyStore(f"sqlite:///{making}", str(path.parent / "mlruns"))
        store.engine.dispose()
        with contextlib.suppress(FileExistsError):
            os.link(making, path)
    finally:
        making.unlink(missing_ok=True)


def empty_store_template() -> Path | None:
    """MLflow's tables, empty, as a SQLite file made once per MLflow version in the cache
    folder (MNISTFLOW_DATA_DIR); None when that folder cannot be written.

    MLflow creates a store by running its whole migration history (about 3.5 s of CPU here);
    a copy of this file takes milliseconds. It holds no experiment 0: that row names the
    artifact folder of the store it is in, so MLflow adds it to each copy when it opens it.
    """
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    folder = DataConfig().data_dir / "stores"
    template = folder / f"empty-mlflow-{mlflow.__version__}.db"
    if template.is_file():
        return template
    making = folder / f".{template.name}.{uuid.uuid4().hex}.making"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        SqlAlchemyStore(f"sqlite:///{making}", str(folder / "mlruns")).engine.dispose()
        with contextlib.closing(sqlite3.connect(making)) as db, db:
            db.execute("DELETE FROM experiments WHERE experiment_id = 0")
        os.replace(making, template)  # whole or not at all, as for a store
    except (OSError, sqlite3.Error, MlflowException):
        return None
    finally:
        making.unlink(missing_ok=True)
    return template


def _check_server(uri: str) -> None:
    import requests  # a dependency of MLflow
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    # MLflow's own request helper, so the check logs in as the client will
    # (MLFLOW_TRACKING_USERNAME/PASSWORD or _TOKEN, ~/.mlflow/credentials, TLS settings).
    creds = get_default_host_creds(uri.rstrip("/"))
    answers = {}
    for endpoint in ("/health", "/version"):
        try:
            # 30 s, not less: a server with logins checks the password hash on a client's first
            # request, which takes seconds on a busy machine.
            answers[endpoint] = http_request(
                creds, endpoint, "GET", max_retries=0, timeout=30, raise_on_status=False
            )
        except (requests.RequestException, MlflowException) as e:
            cause = e.__cause__ if isinstance(e, MlflowException) and e.__cause__ else e
            raise ServerUnavailable(
                f"Cannot reach the MLflow tracking server at {redact(uri)} "
                f"({type(cause).__name__}); start it or point --tracking-uri / "
                "MLFLOW_TRACKING_URI elsewhere."
            ) from e
        if endpoint == "/health":
            health = answers[endpoint]
            if health.status_code != 200 or health.text.strip() != "OK":
                # A 5xx is a server (or the one behind a proxy) that is down: an outage.
                error = ServerUnavailable if health.status_code >= 500 else MnistflowError
                raise error(
                    f"{redact(uri)} is not a healthy MLflow tracking server (/health answered HTTP "
                    f"{health.status_code}); check the URI and whatever proxy is in front of it."
                )
    answer = answers["/version"]
    if answer.status_code in (401, 403):
        raise MnistflowError(remote.describe(answer.status_code, "/version", uri))
    if answer.status_code >= 500:  # e.g. its database is down
        raise ServerUnavailable(str(remote.describe(answer.status_code, "/version", uri)))
    if answer.status_code != 200 or not re.fullmatch(r"\d+\.\d+\S*", answer.text.strip()):
        raise MnistflowError(
            f"{redact(uri)} answers, but not as an MLflow tracking server (/version answered HTTP "
            f"{answer.status_code}); check --tracking-uri / MLFLOW_TRACKING_URI."
        )


def use_store(uri: str | None, create: bool = False) -> str:
    """Point MLflow at the store the user asked for (see resolve_tracking_uri) and check it.

    create=False is for commands that read or change what training wrote: a local SQLite
    store that does not exist yet is refused rather than created empty.
    """
    resolved = resolve_tracking_uri(uri)
    check_reachable(resolved)
    path = sqlite_path(resolved)
    if path is not None and not path.is_file():
        if not create:
            raise MnistflowError(
                f"There is no MLflow store at {path}; train a model first "
                "(mnistflow train) or point --tracking-uri / MLFLOW_TRACKING_URI at your store."
            )
        # Made here, whole, from the migrated template (as spool/targets.py's open_target
        # does): MLflow would run its whole migration history on first use (3.5 s of CPU),
        # and could leave half a store behind.
        check_writable(resolved)
        create_sqlite_store(path)
    return resolved
