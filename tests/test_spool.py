"""Tracking that survives the store going away: a real `mlflow server` on loopback paused,
killed and restarted, never there; an embedded store on a small tmpfs that fills up or is
read-only; `mnistflow sync` delivers exactly once."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import FAST_ARGS, MNISTFLOW, built_once, free_port, run_cli
from mnistflow.lifecycle import registry
from mnistflow.spool import sync, targets
from mnistflow.stack import servers
from mnistflow.store import checks
from spool_faults import StallingProxy

# Each test trains (in a child process, or two) and syncs: tens of seconds.
pytestmark = pytest.mark.slow


@dataclass
class Server:
    """An `mlflow server` on a fixed port and store that can be paused, killed, restarted."""

    folder: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        db = self.folder / "server.db"
        if not db.exists():  # MLflow's tables, copied: creating them costs seconds of CPU
            shutil.copyfile(checks.empty_store_template(), db)
        args = [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
            "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{db}",
            "--artifacts-destination", str(self.folder / "artifacts"),
        ]  # fmt: skip
        bin_dir = str(Path(sys.executable).parent)
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
        self.proc = servers.start(
            args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        servers.wait_until_up(f"{self.uri}/health", self.proc, timeout=120)

    def stop(self) -> None:
        if self.proc is not None:
            servers.stop(self.proc)
            self.proc = None

    def pause(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGCONT)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    server = Server(tmp_path / "server", free_port())
    server.folder.mkdir()
    try:
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError, AssertionError):
            server.resume()
        server.stop()


@pytest.fixture
def spool_folder(_own_spool: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The test's own spool (see conftest); the working directory is tmp_path."""
    monkeypatch.chdir(tmp_path)
    return _own_spool


def histories(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric's history as (step, value) pairs, system metrics left out."""
    run = client.get_run(run_id)
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        for key in run.data.metrics
        if not key.startswith("system/")
    }


def assert_complete(client: MlflowClient, run_id: str, reference: dict) -> None:
    """The server's run holds exactly the reference's metrics, its artifacts and models."""
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    got = histories(client, run_id)
    timing = {"train_seconds", "total_seconds", "epoch_seconds", "images_per_second"}
    for key, expected in reference.items():
        if key in timing:
            assert [s for s, _ in got[key]] == [s for s, _ in expected], key
        else:
            assert got[key] == expected, key
    assert set(got) == set(reference)
    artifacts = {a.path for a in client.list_artifacts(run_id, "reports")}
    assert "reports/confusion_matrix.png" in artifacts
    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    assert {m.name for m in models} >= {"model"}
    served = next(m for m in models if m.name == "model")
    loaded = mlflow.pyfunc.load_model(f"models:/{served.model_id}")
    assert loaded.unwrap_python_model().classify(np.zeros((1, 28, 28), "float32"))[1].shape == (
        1,
        10,
    )


TRAIN = ["train", *FAST_ARGS, "--seed", "3", "--json"]


def _reference_run(folder: Path) -> dict:
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        result = run_cli(*TRAIN, "--tracking-uri", uri)
    assert result.exit_code == 0, result.stderr
    return histories(MlflowClient(uri), result.json()["run_id"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The metric histories of the same run logged to an embedded store, without faults.

    Trained once for all workers (conftest.built_once); JSON gives the pairs back as lists.
    """
    _, shared = built_once(tmp_path_factory, "spool-reference", _reference_run)
    return {key: [tuple(pair) for pair in pairs] for key, pairs in shared.items()}


def start_training(spawn, uri: str, *extra: str) -> subprocess.Popen[str]:
    return spawn([*MNISTFLOW, *TRAIN, "--tracking-uri", uri, *extra])


def finish(proc: subprocess.Popen[str], timeout: float = 300, code: int = 0) -> dict:
    """The training command's outcome; code: its exit code (75: kept in the spool)."""
    stdout, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr
    return {"json": json.loads(stdout.strip().splitlines()[-1]), "stderr": stderr}


def wait_for_run(uri: str, timeout: float = 120, db: Path | None = None) -> str:
    """The id of the run the training command opened in the store at uri, once it is there.

    db: a SQLite store's file, not opened before it exists (the command makes it whole).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if db is None or db.exists():
            client = MlflowClient(uri)
            experiment = client.get_experiment_by_name("mnist")
            runs = client.search_runs([experiment.experiment_id]) if experiment else []
            if runs:
                return runs[0].info.run_id
        time.sleep(0.2)
    raise AssertionError(f"the training run never appeared in {uri}")


def only_run(server: Server) -> str:
    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name("mnist")
    (run,) = client.search_runs([experiment.experiment_id])
    return run.info.run_id


@pytest.mark.server  # a real mlflow server it pauses, kills or never starts
@pytest.mark.parametrize(
    "pause_s",
    [4, targets.REQUEST_TIMEOUT_S + 6],
    ids=["shorter-than-timeout", "longer-than-timeout"],
)
def test_a_paused_server_costs_the_run_nothing(server, spool_folder, reference, spawn, pause_s):
    server.start()
    proc = start_training(spawn, server.uri)
    run_id = wait_for_run(server.uri)
    server.pause()  # hangs: connections are accepted, nothing answers
    time.sleep(pause_s)  # longer: requests time out, and the server takes them late
    server.resume()
    outcome = finish(proc)
    assert outcome["json"]["run_id"] == run_id and outcome["json"]["spooled"] is False
    mlflow.set_tracking_uri(server.uri)
    assert_complete(MlflowClient(server.uri), run_id, reference)
    assert only_run(server) == run_id  # one run, not a second one
    assert run_cli("sync", "--list", "--json").json()["pending"] == []


@pytest.mark.server  # a real mlflow server behind a proxy that stalls, then passes again
def test_a_stalling_proxy_costs_the_run_nothing(server, spool_folder, reference, spawn):
    server.start()
    proxy = StallingProxy(server.port)
    proxy.start()
    try:
        uri = f"http://127.0.0.1:{proxy.port}"
        proc = start_training(spawn, uri)
        run_id = wait_for_run(uri)
        proxy.mode = "stall"  # accepts, holds every request longer than the request timeout
        time.sleep(targets.REQUEST_TIMEOUT_S + 4)
        proxy.mode = "slow"  # then answers, slowly
        time.sleep(3)
        proxy.mode = "pass"
        outcome = finish(proc)
    finally:
        proxy.stop()
    assert outcome["json"]["spooled"] is False
    mlflow.set_tracking_uri(server.uri)
    assert_complete(MlflowClient(server.uri), run_id, reference)
    assert only_run(server) == run_id


@pytest.mark.server  # a real mlflow server; the training process is killed mid-run
def test_a_killed_training_run_is_completed_by_sync(server, spool_folder, spawn):
    server.start()
    proc = start_training(spawn, server.uri, "--epochs", "30")  # long enough to be killed
    run_id = wait_for_run(server.uri)
    # Killed once some steps are in the spool (the forwarder copied some of them already).
    spool_uri = targets.spool_uri()
    wait_for_metric(spool_uri, "train_loss")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    (waiting,) = run_cli("sync", "--list", "--json").json()["pending"]
    assert waiting["status"] == "RUNNING"  # as the dead process left it

    synced = run_cli("sync", "--json")
    assert synced.exit_code == 0, synced.stderr
    (result,) = synced.json()["synced"]
    assert result["complete"] and result["remote_run_id"] == run_id
    assert result["note"] == sync.DIED
    client = MlflowClient(server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["failure_reason"] == sync.DIED
    # The server holds exactly what the dead process had logged.
    spooled = MlflowClient(spool_uri)
    assert histories(client, run_id) == histories(spooled, waiting["spool_run_id"])
    assert run_cli("sync", "--json").json()["synced"] == []
    assert only_run(server) == run_id


def wait_for_metric(uri: str, key: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            runs = runs_in(uri)
            if runs and key in MlflowClient(uri).get_run(runs[0]).data.metrics:
                return
        time.sleep(0.1)
    raise AssertionError(f"no {key} in {uri}")


@pytest.mark.server  # a real mlflow server it pauses, kills or never starts
def test_a_restarted_server_gets_the_same_run_completed(server, spool_folder, reference, spawn):
    server.start()
    proc = start_training(spawn, server.uri)
    run_id = wait_for_run(server.uri)
    server.stop()  # connections refused
    time.sleep(3)
    server.start()  # same store, same port
    outcome = finish(proc)
    assert outcome["json"]["run_id"] == run_id and outcome["json"]["spooled"] is False
    mlflow.set_tracking_uri(server.uri)
    assert_complete(MlflowClient(server.uri), run_id, reference)
    assert only_run(server) == run_id


@pytest.mark.server  # a real mlflow server it pauses, kills or never starts
def test_a_server_gone_for_good_leaves_the_run_to_sync_once(server, spool_folder, reference, spawn):
    server.start()
    proc = start_training(spawn, server.uri, "--register", "--wait-for-server", "2")
    run_id = wait_for_run(server.uri)
    server.stop()
    outcome = finish(proc, code=75)
    assert outcome["json"]["spooled"] is True
    assert "mnistflow sync" in " ".join(outcome["stderr"].split())
    waiting = run_cli("sync", "--list", "--json")
    assert [r["server_run_id"] for r in waiting.json()["pending"]] == [run_id]

    server.start()
    first = run_cli("sync", "--json")
    assert first.exit_code == 0, first.stderr
    (synced,) = first.json()["synced"]
    assert synced["complete"] and synced["remote_run_id"] == run_id  # the same run, completed
    mlflow.set_tracking_uri(server.uri)
    client = MlflowClient(server.uri)
    assert_complete(client, run_id, reference)
    assert client.get_model_version("mnist", synced["registered_version"]).run_id == run_id

    # Again: nothing is sent twice, nothing waits.
    before = histories(client, run_id)
    assert run_cli("sync", "--json").json()["synced"] == []
    assert histories(client, run_id) == before and only_run(server) == run_id
    assert len(client.search_model_versions("name='mnist'")) == 1


@pytest.mark.server  # a real mlflow server it pauses, kills or never starts
def test_no_server_at_start_trains_into_the_spool(server, spool_folder, reference, cli):
    refused = cli(*TRAIN, "--tracking-uri", server.uri, "--require-server")
    assert refused.exit_code == 1 and "Cannot reach the MLflow tracking server" in refused.stderr

    result = cli(*TRAIN, "--tracking-uri", server.uri, "--wait-for-server", "0")
    assert result.exit_code == 75, result.stderr
    assert result.json()["spooled"] is True
    server.start()
    synced = cli("sync", "--json")
    assert synced.exit_code == 0, synced.stderr
    (only,) = synced.json()["synced"]
    mlflow.set_tracking_uri(server.uri)
    client = MlflowClient(server.uri)
    assert_complete(client, only["remote_run_id"], reference)
    assert cli("sync", "--json").json()["synced"] == []


@pytest.mark.server  # a real mlflow server; `mnistflow sync` is killed half-way
@pytest.mark.parametrize("after_s", [1.5, 4.0])
def test_a_sync_killed_half_way_is_completed_by_the_next(
    server, spool_folder, reference, cli, spawn, after_s
):
    result = cli(*TRAIN, "--tracking-uri", server.uri, "--wait-for-server", "0", "--register")
    assert result.exit_code == 75, result.stderr
    server.start()
    first = spawn([*MNISTFLOW, "sync"])
    time.sleep(after_s)  # a moment into its copy (or after: then it is whole already)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    again = cli("sync", "--json")
    assert again.exit_code == 0, again.stderr
    client = MlflowClient(server.uri)
    (run_id,) = runs_in(server.uri)
    mlflow.set_tracking_uri(server.uri)
    assert_complete(client, run_id, reference)
    (version,) = client.search_model_versions("name='mnist'")  # registered once
    assert version.run_id == run_id
    assert registry.alias_version(client, "mnist", "challenger") == version.version
    assert cli("sync", "--json").json()["synced"] == []


# -- an embedded store whose disk fills up, or that is read-only --------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A folder on a 16 MB tmpfs of its own, unmounted at teardown (mounting needs root)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)]
    mounted = subprocess.run(mount, capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip() or 'refused'}")
    try:
        yield folder
    finally:
        # Lazily, should a child still hold a file there: the mount goes either way.
        subprocess.run(["umount", "--lazy", str(folder)], check=False)


def fill(folder: Path) -> Path:
    """Fill folder's disk to the brim with one file."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as f:
        for size in (1 << 20, 1 << 12):  # MBs, then pages, until neither fits
            with contextlib.suppress(OSError):
                while True:
                    f.write(bytes(size))
    return filler


def runs_in(uri: str) -> list[str]:
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return [r.info.run_id for r in client.search_runs(experiments)]


def test_a_store_whose_disk_fills_mid_run_loses_nothing(small_disk, spool_folder, reference, spawn):
    db = small_disk / "mlflow.db"
    uri = f"sqlite:///{db}"
    proc = start_training(spawn, uri, "--register")
    run_id = wait_for_run(f"sqlite:///{db}", db=db)  # the run has started in the store
    filler = fill(small_disk)
    outcome = finish(proc, code=75)  # training went on: kept in the spool, no traceback
    assert outcome["json"]["spooled"] is True and outcome["json"]["run_id"] == run_id
    said = " ".join(outcome["stderr"].split())
    assert f"The MLflow store {uri} cannot be written now: its disk is full." in said
    assert "send it with mnistflow sync once the store can be written again" in said

    filler.unlink()
    first = run_cli("sync", "--json")
    assert first.exit_code == 0, first.stderr
    (synced,) = first.json()["synced"]
    assert synced["complete"] and synced["remote_run_id"] == run_id  # the same run, completed
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    assert_complete(client, run_id, reference)
    assert "failure_reason" not in client.get_run(run_id).data.tags
    assert client.get_model_version("mnist", synced["registered_version"]).run_id == run_id

    # Again: nothing is sent twice, nothing waits.
    before = histories(client, run_id)
    assert run_cli("sync", "--json").json()["synced"] == []
    assert histories(client, run_id) == before and runs_in(uri) == [run_id]
    assert len(client.search_model_versions("name='mnist'")) == 1


def test_a_full_store_at_start_trains_into_the_spool_unless_required(
    small_disk, spool_folder, reference, cli, caplog
):
    uri = f"sqlite:///{small_disk / 'mlflow.db'}"
    filler = fill(small_disk)
    refused = cli(*TRAIN, "--tracking-uri", uri, "--require-server")
    assert refused.exit_code == 1 and "Traceback" not in refused.stderr
    assert " ".join(refused.stderr.split()) == (
        f"Error: The MLflow store {uri} cannot be written now: its disk is full."
    )
    assert [p.name for p in small_disk.iterdir()] == ["filler"]  # no store made
    assert runs_in(targets.spool_uri()) == []  # and nothing spooled

    result = cli(*TRAIN, "--tracking-uri", uri)
    assert result.exit_code == 75, result.stderr
    assert result.json()["spooled"] is True
    warned = f"The MLflow store {uri} cannot be written now: its disk is full. Training goes on"
    assert len([m for m in caplog.messages if m.startswith(warned)]) == 1  # warned once
    assert "The run is kept in the local spool; send it with mnistflow sync" in " ".join(
        result.stderr.split()
    )

    filler.unlink()
    synced = cli("sync", "--json")
    assert synced.exit_code == 0, synced.stderr
    (only,) = synced.json()["synced"]
    mlflow.set_tracking_uri(uri)
    assert_complete(MlflowClient(uri), only["remote_run_id"], reference)
    assert cli("sync", "--json").json()["synced"] == []
    assert runs_in(uri) == [only["remote_run_id"]]


def test_a_read_only_store_spools_and_a_store_gone_is_not_made_again(small_disk, spool_folder, cli):
    uri = f"sqlite:///{small_disk / 'mlflow.db'}"
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    result = cli(*TRAIN, "--tracking-uri", uri)
    assert result.exit_code == 75, result.stderr
    assert result.json()["spooled"] is True
    assert result.json()["spool_reason"] == (
        f"The MLflow store {uri} cannot be written now: it is read-only."
    )

    # The store's folder goes away: sync says so and makes nothing in its place.
    subprocess.run(["umount", str(small_disk)], check=True)
    small_disk.rmdir()
    synced = cli("sync", "--json")
    assert synced.exit_code == 1 and "Traceback" not in synced.stderr
    (waited,) = synced.json()["synced"]
    assert waited["error"] == (
        f"the folder of the MLflow store {uri} no longer exists; create {small_disk} to send "
        "the run there"
    )
    assert not small_disk.exists()
    (waiting,) = cli("sync", "--list", "--json").json()["pending"]
    assert waiting["server"] == uri


def test_a_spool_on_a_full_disk_says_so_and_where_to_move_it(small_disk, store, cli, monkeypatch):
    fill(small_disk)
    monkeypatch.setenv("MNISTFLOW_SPOOL_DIR", str(small_disk / "spool"))
    result = cli(*TRAIN, "--tracking-uri", store)
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert " ".join(result.stderr.split()).endswith(
        f"Error: The local spool sqlite:///{small_disk / 'spool' / 'spool.db'} cannot be "
        "written now: its disk is full; set MNISTFLOW_SPOOL_DIR to a folder on another disk."
    )
    assert not Path(store.removeprefix("sqlite:///")).exists()  # no store made either


def test_a_pipeline_whose_run_waits_promotes_nothing(registered, tmp_path, monkeypatch):
    # A store of our own with @champion at 1 and someone else's version 2 at @challenger.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    shutil.copyfile(registered[1]["folder"] / "mlflow.db", tmp_path / "mlflow.db")
    client = MlflowClient(uri, registry_uri=uri)
    registry.register(client, registered[1]["good"]["run_id"], "mnist")
    aliases = client.get_registered_model("mnist").aliases
    assert {k: str(v) for k, v in aliases.items()} == {"champion": "1", "challenger": "2"}

    # The store cannot be written (its disk full): the run trains into the spool.
    def full(store: str) -> None:
        raise checks.StoreUnwritable(
            f"The MLflow store {store} cannot be written now: its disk is full."
        ) from OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checks, "check_writable", full)
    monkeypatch.chdir(tmp_path)
    result = run_cli(
        "pipeline", "--limit-train", "2000", "--epochs", "1", "--tracking-uri", uri, "--json"
    )
    assert result.exit_code == 75, result.stderr
    assert result.json()["promotion"] is None and result.json()["train"]["spooled"] is True
    said = " ".join(result.stderr.split())
    assert "The run is kept in the local spool" in said
    assert "Nothing was promoted: the new model is registered only once its run is sent" in said
    assert client.get_registered_model("mnist").aliases == aliases  # nobody's model promoted
