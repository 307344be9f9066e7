"""Where a study lives (an Optuna journal file, or a database) and the lock around setting
one up; the pruner and sampler a study is made with."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from mnistflow.config import (
    MnistflowError,
)
from mnistflow.store.uris import redact
from mnistflow.sweep.definition import SweepDefinition

if TYPE_CHECKING:
    import optuna


# Several local processes append to one journal file safely (Optuna locks each append); an
# SQLite file also works for one process but fails with "database is locked" under parallel
# writers, which is why the local default is a journal, not SQLite.
DEFAULT_STORAGE = "optuna-journal.log"
# Arbitrary but fixed: the PostgreSQL advisory lock that serialises study set-up.
_ADVISORY_LOCK_KEY = 0x6D6E697374  # "mnist"


# -- storage --------------------------------------------------------------------------------


def storage_url(storage: str | None) -> str:
    """The storage as Optuna takes it: postgresql:// URLs get the psycopg 3 driver."""
    url = storage or DEFAULT_STORAGE
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url.removeprefix(scheme)
    return url


def open_storage(url: str, create_tables: bool = False) -> optuna.storages.BaseStorage:
    """Optuna's storage for url: a journal file for a path, the RDB storage for a URL.

    create_tables: only the command that sets the study up creates RDB tables (under a lock);
    its workers skip the creation, which would race between them.
    """
    import optuna

    if "://" not in url:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url).expanduser()
        if not path.parent.is_dir():
            raise MnistflowError(f"Cannot keep the study in {path}: {path.parent} is no folder.")
        return JournalStorage(JournalFileBackend(str(path)))
    try:
        return optuna.storages.RDBStorage(url, skip_table_creation=not create_tables)
    except Exception as e:  # SQLAlchemy's connection and driver errors, all one sentence here
        raise MnistflowError(
            _driver_missing(e, url)
            or f"Cannot open the study storage {redact(url)} ({type(e).__name__}); check the "
            "URL and that the database server is reachable."
        ) from e


def _driver_missing(error: BaseException, url: str) -> str | None:
    """One sentence when error (or its cause) is the database driver not being installed."""
    current: BaseException | None = error
    while current is not None:
        if isinstance(current, ImportError):
            if url.startswith("postgresql"):
                return (
                    "The PostgreSQL driver (psycopg) is not installed; install the team extra: "
                    "pip install 'mnistflow[team]'."
                )
            return (
                f"The database driver for {redact(url)} is not installed ({current}); install it "
                "or keep the study in a journal file (--storage PATH)."
            )
        current = current.__cause__ or current.__context__
    return None


@contextlib.contextmanager
def setup_lock(url: str) -> Iterator[None]:
    """Serialise study set-up (tables, study, parent run) between commands that start at once.

    PostgreSQL: an advisory lock, which works across machines. Files: an fcntl lock on a
    file beside the storage. Other databases: no lock.
    """
    if url.startswith("postgresql"):
        import sqlalchemy

        try:
            engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
            connection = engine.connect()
        except Exception as e:
            raise MnistflowError(
                _driver_missing(e, url)
                or f"Cannot reach the study storage {redact(url)} ({type(e).__name__}); check "
                "the URL and that PostgreSQL is running."
            ) from e
        try:
            connection.execute(sqlalchemy.text(f"SELECT pg_advisory_lock({_ADVISORY_LOCK_KEY})"))
            yield
        finally:
            # Closing the session releases the advisory lock with it.
            connection.close()
            engine.dispose()
        return
    path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url
    if "://" in path:
        yield
        return
    import fcntl

    lock_path = Path(path).expanduser().with_name(Path(path).name + ".setup-lock")
    try:
        handle = lock_path.open("a")
    except OSError as e:
        raise MnistflowError(f"Cannot keep the study beside {path}: {e.strerror}.") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def make_pruner(definition: SweepDefinition) -> optuna.pruners.BasePruner:
    import optuna

    if definition.pruner == "median":
        # Stops a trial whose validation accuracy after an epoch is below the median of the
        # earlier trials at that epoch: needs no budget or rung set-up, and with the fast
        # preset's 1-2 epochs there is only one decision point anyway, where halving would
        # keep just the top 1/reduction_factor.
        return optuna.pruners.MedianPruner(n_startup_trials=definition.prune_after_trials)
    if definition.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    return optuna.pruners.NopPruner()


def make_sampler(seed: int | None) -> optuna.samplers.BaseSampler:
    import optuna

    # constant_liar: running trials count as bad so parallel workers do not draw the same point.
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def describe_pruner(definition: SweepDefinition) -> str:
    if definition.pruner == "median":
        return f"MedianPruner(n_startup_trials={definition.prune_after_trials})"
    if definition.pruner == "halving":
        return "SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)"
    return "NopPruner (no pruning)"
