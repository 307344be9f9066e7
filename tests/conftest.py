"""Shared fixtures: the real MNIST files from a local mirror, MLflow stores in temp dirs,
free loopback ports, and the CLI run in-process or as a child that is always reaped."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pytest
from filelock import FileLock
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from mnistflow.cli.app import app
from mnistflow.config import DataConfig
from mnistflow.data import writers
from mnistflow.lifecycle import registry
from mnistflow.spool import targets
from mnistflow.stack import servers
from mnistflow.stack.servers import free_port as free_port
from mnistflow.stack.servers import wait_until_up as wait_until_up
from mnistflow.store import checks
from mnistflow.store.uris import sqlite_path

ROOT = Path(__file__).resolve().parents[1]
MIRROR = Path(os.environ.get("MNISTFLOW_MNIST_MIRROR") or ROOT.parent / "shared" / "mnist")
# Small enough to train in about a second, large enough for the model to learn something.
FAST_ARGS = ["--limit-train", "2000", "--epochs", "2", "--no-system-metrics"]


def pytest_configure(config: pytest.Config) -> None:
    """Ctrl-C works in the children the tests start, however pytest was started.

    A shell starts a background job (`make test &`, a CI runner's nohup) with SIGINT ignored;
    children inherit that, Python then installs no Ctrl-C handler in them, and the tests that
    press Ctrl-C on a training or a sweep wait in vain. A Python handler here is reset to the
    default in every child, as in a terminal.
    """
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    # `make test` runs three tests at a time on two cores, each with its children: PyTorch's
    # and OpenMP's thread pools, sized to the cores in every process, spin waiting on each
    # other when processes outnumber cores. One compute thread per process does the same work
    # in less CPU (3 small trainings at once: 27-39 s against 37-46 s); a user's setting wins.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def _hermetic_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every test reads MNIST from the local mirror and never touches the user's stores."""
    if not MIRROR.is_dir():
        pytest.exit(
            f"MNIST mirror {MIRROR} not found: set MNISTFLOW_MNIST_MIRROR to a folder with the "
            "four MNIST .gz files.",
            returncode=4,
        )
    saved = dict(os.environ)
    os.environ["MNISTFLOW_MNIST_MIRROR"] = str(MIRROR)
    # One data cache for all pytest-xdist workers: the other-writers set (12 s of CPU) is
    # rendered once, not once per worker.
    os.environ["MNISTFLOW_DATA_DIR"] = str(shared_folder(tmp_path_factory) / "data-cache")
    # Rendered here, once, under a lock: workers that start together would each render it.
    with FileLock(str(shared_folder(tmp_path_factory) / "writers.lock")):
        writers.load(DataConfig())
    # Runs are spooled here (and per test, see _own_spool), never in the user's home.
    os.environ["MNISTFLOW_SPOOL_DIR"] = str(tmp_path_factory.mktemp("spool"))
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("MLFLOW_REGISTRY_URI", None)
    # `mlflow server` otherwise starts job consumers (huey processes, each importing MLflow:
    # seconds of CPU per server) for GenAI jobs that nothing here runs.
    os.environ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def _empty_spool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty spool store, made once: MLflow takes seconds to create its tables."""
    folder = tmp_path_factory.mktemp("empty-spool")
    targets.spool_uri(folder)
    return folder / "spool.db"


@pytest.fixture(autouse=True)
def _own_spool(
    _empty_spool: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Each test spools into a folder of its own (runs for embedded stores go through the
    spool too), so a run one test leaves waiting is never sent to another test's store."""
    folder = tmp_path_factory.mktemp("spool")
    shutil.copyfile(_empty_spool, folder / "spool.db")
    monkeypatch.setenv("MNISTFLOW_SPOOL_DIR", str(folder))
    return folder


@pytest.fixture(autouse=True)
def _forget_tracking_uri() -> Iterator[None]:
    """In-process CLI calls set MLflow's global tracking URI; each test starts without one."""
    yield
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh sqlite tracking store; the working dir is tmp_path, so ./mlruns lands there."""
    monkeypatch.chdir(tmp_path)
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def made(store_uri: str) -> str:
    """store_uri (sqlite:///...), its store made now as mnistflow makes one (MLflow's tables
    copied from a migrated template, see store/checks.py): for tests that need a store to
    exist, without MLflow's 3.5 s of migrations."""
    path = sqlite_path(store_uri)
    assert path is not None, store_uri
    checks.create_sqlite_store(path)
    return store_uri


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    def json(self) -> dict:
        """The object --json prints on the last line of stdout."""
        return json.loads(self.stdout.strip().splitlines()[-1])


def run_cli(*args: str) -> CliResult:
    """Invoke the real `mnistflow` entry point in-process (fast: no interpreter start-up)."""
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    return CliResult(result.exit_code, result.stdout, result.stderr)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def spawn() -> Iterator:
    """Start children in their own process groups; all of them are ended at teardown."""
    children: list[subprocess.Popen[str]] = []

    def start(args: list[str], **kwargs) -> subprocess.Popen[str]:
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        proc = servers.start(args, text=True, **kwargs)
        children.append(proc)
        return proc

    yield start
    # Each child with everything it started (e.g. mlflow's huey consumers).
    for proc in children:
        servers.stop(proc)


def tool_env(**extra: str) -> dict[str, str]:
    """The environment for MLflow's own commands: they start `uvicorn` and friends by name,
    so this venv's bin folder must be on PATH, as it is when the venv is activated."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


def train(*args: str) -> dict:
    result = run_cli("train", "--no-system-metrics", "--json", *args)
    assert result.exit_code == 0, result.stderr
    return result.json()


def shared_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This test run's temporary folder, the same for every pytest-xdist worker."""
    base = tmp_path_factory.getbasetemp()
    # A worker's basetemp is <run>/popen-gwN; the run's folder above it is shared by all.
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(
    tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], Any]
) -> tuple[Path, Any]:
    """The folder build(folder) filled and its result (JSON), made once per test session
    however many pytest-xdist workers ask: the first builds under a file lock, the others
    wait for it and read it. The folder is shared: copy what a test writes to.

    `make test`'s time is CPU-bound on 2 cores, and a session fixture is otherwise built
    again on every worker (the pattern pytest-xdist documents for this).
    """
    shared = shared_folder(tmp_path_factory)
    folder, result = shared / f"built-{name}", shared / f"built-{name}.json"
    with FileLock(str(shared / f"built-{name}.lock")):
        if not result.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed half-way
            folder.mkdir()
            result.write_text(json.dumps(build(folder)))
    return folder, json.loads(result.read_text())


def _registered_store(folder: Path) -> dict[str, Any]:
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        good = train("--limit-train", "4000", "--epochs", "2", "--register", "--tracking-uri", uri)
        poor = train(
            "--limit-train", "300", "--epochs", "1", "--lr", "0.001", "--seed", "1",
            "--tracking-uri", uri,
        )  # fmt: skip
    registry.make_champion(MlflowClient(uri), "mnist", "1", "test fixture")
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
    return {"good": good, "poor": poor}


@pytest.fixture(scope="session")
def registered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, Any]]]:
    """A store with a decent run, registered as mnist v1 and made @champion, and a poor run.

    Trained once per session (built_once); each worker gets its own copy of the database,
    whose runs keep their artifacts in the shared folder (written once, then only read).
    The promotion tests register both runs again under their own name, "digits", so the
    tests that use mnist@champion do not depend on the order tests run in.
    """
    built, runs = built_once(tmp_path_factory, "registered", _registered_store)
    folder = tmp_path_factory.mktemp("registered")
    shutil.copyfile(built / "mlflow.db", folder / "mlflow.db")
    yield f"sqlite:///{folder / 'mlflow.db'}", {**runs, "folder": folder}


# The fixtures that train models (tens of seconds each, once per module or session): a test
# that uses one, directly or through another fixture, is slow, so `make test-fast` (-m "not
# slow") leaves it to `make test`. Marked here, by what the test needs; other long tests carry
# their own mark.
TRAINING_FIXTURES = {"registered", "trained", "tracked", "lightning", "baseline", "swept"}


# Module fixtures that train: under pytest-xdist, every test that uses one is sent to the same
# worker, so the fixture is built once rather than on each worker (the CPU is the limit).
GROUPED_FIXTURES = ("tracked", "lightning", "baseline", "swept")


# tryfirst: xdist's own hook reads the xdist_group marks (it suffixes node ids with them).
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if TRAINING_FIXTURES.intersection(used):
            item.add_marker(pytest.mark.slow)
        group = next((name for name in GROUPED_FIXTURES if name in used), None)
        if group and item.get_closest_marker("xdist_group") is None:  # the team's group stays
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def test_split() -> Any:
    """The 10,000 MNIST test digits, loaded once."""
    from mnistflow import data

    return data.load(DataConfig(mirror=str(MIRROR))).test


@pytest.fixture
def champion(registered: tuple[str, dict[str, Any]]) -> str:
    """The registered store (mnist@champion is version 1), as MLflow's tracking URI."""
    uri, _ = registered
    mlflow.set_tracking_uri(uri)
    return uri


# The installed entry point, as a user runs it.
MNISTFLOW = [sys.executable, "-m", "mnistflow"]


# -- the team stack: PostgreSQL + S3 + MLflow server with logins (see mnistflow.stack) --------

WRITER, READER = "alice", "bob"


@pytest.fixture(scope="session")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One team stack for the session, with a writer (alice) and a read-only user (bob)."""
    from mnistflow.stack import team as stack

    with stack.team_stack(tmp_path_factory.mktemp("team-stack")) as running:
        running.add_user(WRITER, "alice-password-1")
        running.add_user(READER, "bob-password-22")
        yield running


def user_env(team: Any, user: str | None, password: str | None = None) -> dict[str, str]:
    """A client's whole environment: the tracking URI and a login, no bucket credentials."""
    from mnistflow.stack.team import client_free_env

    env = {**client_free_env(tool_env()), **team.client_env(user)}
    if password is not None:
        env["MLFLOW_TRACKING_PASSWORD"] = password
    return env


@contextlib.contextmanager
def as_user(team: Any, user: str | None, password: str | None = None) -> Iterator[None]:
    """This process as a client of the stack (in-process CLI calls and MlflowClient)."""
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.startswith(("AWS_", "MLFLOW_S3_", "MLFLOW_TRACKING_")):
                mp.delenv(key)
        for key, value in user_env(team, user, password).items():
            if key.startswith("MLFLOW_"):
                mp.setenv(key, value)
        mlflow.set_tracking_uri(team.tracking_uri)
        yield


# -- running in parallel ----------------------------------------------------------------------
# `make test` runs pytest-xdist with --dist loadgroup: the test files that share a costly
# session resource (the team stack: PostgreSQL, S3 and an MLflow server; the Spark session)
# mark themselves xdist_group("team") or ("spark"), so one worker starts it once.


def assert_abstention_logged(client: MlflowClient, run_id: str) -> None:
    """A training run's abstain measures: logged, in range, and the threshold the same as
    the one its served model carries (whoever trained it)."""
    metrics = client.get_run(run_id).data.metrics
    assert 0 < metrics["abstain_below"] < 1
    assert 0 < metrics["test_abstain_rate"] <= 0.1  # about 2%, chosen on validation
    assert metrics["test_accuracy_answered"] >= metrics["test_accuracy"]
    assert 0.5 < metrics["nondigit_auroc"] <= 1 and 0 < metrics["nondigit_abstain_rate"] <= 1
    (model,) = client.search_logged_models(
        [client.get_run(run_id).info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = 'model'",
    )
    config = mlflow.pyfunc.load_model(model.artifact_location).model_config
    assert config["abstain_below"] == metrics["abstain_below"]
