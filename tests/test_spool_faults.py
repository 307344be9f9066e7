"""Fault injection at every step of a spool run's copy: the target's client fails at its
k-th call, for every k over a whole copy (run, params, tags, inputs, metric batches,
artifacts, model creation, model files, finalize, registration, alias, end), before the call
took effect and after it (the answer lost). Copies are then repeated until one completes,
and the target must hold exactly what a fault-free copy gives; copying again changes nothing.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from conftest import run_cli
from mnistflow.lifecycle import registry
from mnistflow.spool import sync, targets
from mnistflow.spool.copier import RunCopier, SyncResult
from mnistflow.store import checks, experiments
from spool_faults import KINDS, FaultyClient, differences, snapshot


class Constant(mlflow.pyfunc.PythonModel):  # type: ignore[misc]
    """A tiny model: the copy is what is tested, not the network."""

    def predict(self, context, model_input, params=None):
        return np.zeros((len(model_input), 10), dtype="float32")


@dataclass
class Bench:
    """A spool holding one finished run, copied afresh for each copy (its files are dropped
    after one), and empty targets."""

    root: Path
    run_id: str
    empty_store: Path

    def restore(self, name: str) -> MlflowClient:
        """A spool of its own, as the template was before any copy. A new folder each time:
        MLflow keeps one database engine per store URI, which a file replaced under the same
        path would break; the run's artifact locations are moved along."""
        template, folder = self.root / "template", self.root / "spools" / name
        shutil.copytree(template, folder)
        with contextlib.closing(sqlite3.connect(folder / "spool.db")) as db, db:
            for table, column in (
                ("runs", "artifact_uri"),
                ("experiments", "artifact_location"),
                ("logged_models", "artifact_location"),
            ):
                db.execute(
                    f"UPDATE {table} SET {column} = replace({column}, ?, ?)",
                    (str(template), str(folder)),
                )
        return MlflowClient(f"sqlite:///{folder / 'spool.db'}")

    def target(self, name: str) -> str:
        folder = self.root / "targets" / name
        folder.mkdir(parents=True)
        shutil.copyfile(self.empty_store, folder / "mlflow.db")
        return f"sqlite:///{folder / 'mlflow.db'}"


def _make_run(uri: str, reports: Path) -> str:
    """One finished run as training leaves it in the spool: params, tags, a dataset input,
    per-step and per-epoch metrics (a NaN among them), system metrics, artifacts in folders,
    a logged model with metrics linked to it, and a registration asked for."""
    mlflow.set_tracking_uri(uri)
    experiment = experiments.create_experiment(MlflowClient(uri), uri, "mnist")
    with mlflow.start_run(experiment_id=experiment, run_name="faulty") as run:
        mlflow.log_params({"lr": 0.01, "epochs": 2, "train.arch": "fastnet"})
        mlflow.set_tags({"preset": "fast", "device": "cpu", "mlflow.note.content": "a run"})
        dataset = mlflow.data.from_numpy(np.zeros((4, 2)), targets=np.zeros(4), name="mnist-train")
        mlflow.log_input(dataset, context="train")
        client = MlflowClient(uri)
        steps = [
            Metric(key, value, 1_700_000_000_000 + step, step)
            for step in range(150)
            for key, value in (("train_loss", 2.0 / (step + 1)), ("lr", 0.01 * step))
        ]
        steps.append(Metric("grad_norm", float("nan"), 1_700_000_000_500, 3))
        for start in range(0, len(steps), 100):
            client.log_batch(run.info.run_id, metrics=steps[start : start + 100])
        for epoch in (1, 2):
            mlflow.log_metrics({"val_accuracy": 0.9 + epoch / 100}, step=epoch)
            mlflow.log_metric("system/cpu_utilization_percentage", 50.0 + epoch, step=epoch)
        mlflow.log_text('{"seed": 3}', "config.json")
        mlflow.log_artifacts(str(reports), artifact_path="reports")
        model = mlflow.pyfunc.log_model(name="model", python_model=Constant(), pip_requirements=[])
        mlflow.log_metric("test_accuracy", 0.95, model_id=model.model_id)
        mlflow.log_metric("test_loss", 0.2, model_id=model.model_id)
    spool_client = MlflowClient(uri)
    spool_client.set_tag(run.info.run_id, targets.TARGET, "sqlite:////nowhere/mlflow.db")
    spool_client.set_tag(run.info.run_id, targets.REGISTER_AS, "mnist")
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
    return str(run.info.run_id)


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    root = tmp_path_factory.mktemp("faults")
    reports = root / "reports"
    (reports / "curves").mkdir(parents=True)
    (reports / "per_class.csv").write_text("digit,accuracy\n0,0.99\n")
    (reports / "curves" / "loss.png").write_bytes(bytes(range(256)) * 40)
    run_id = _make_run(targets.spool_uri(root / "template"), reports)
    empty = root / "empty.db"
    checks.create_sqlite_store(empty)
    yield Bench(root, run_id, empty)


def _copy_until_complete(
    spool_client: MlflowClient, run_id: str, target: str, client: FaultyClient, fresh_every: int = 1
) -> SyncResult:
    """Copies again after each failure, as the command's final copy (the same copier) and
    `mnistflow sync` (a new one) do; fresh_every: a new copier after this many failures."""
    copier = RunCopier(spool_client, target, run_id, _remote=client)  # type: ignore[arg-type]
    for attempt in range(6):
        try:
            result = copier.finish()
        except Exception:
            if (attempt + 1) % fresh_every == 0:
                copier = RunCopier(spool_client, target, run_id, _remote=client)  # type: ignore[arg-type]
            continue
        assert result.complete, result
        return result
    raise AssertionError(f"the copy never completed; calls: {client.calls}")


@pytest.fixture(scope="module")
def reference(bench: Bench) -> tuple[dict, list[str]]:
    """A fault-free copy: what every faulty one must equal, and the calls it made."""
    spool_client = bench.restore("reference")
    target = bench.target("reference")
    client = FaultyClient(targets.open_target(target))
    result = _copy_until_complete(spool_client, bench.run_id, target, client)
    assert result.registered_version == "1"
    shot = snapshot(target, result.remote_run_id or "")
    # The copy is whole: every part of the run arrived, the model loads and predicts.
    assert shot["status"] == "FINISHED" and shot["metrics"]["train_loss"][149][1] == 149
    assert set(shot["artifacts"]) == {
        "config.json", "reports/per_class.csv", "reports/curves/loss.png"
    }  # fmt: skip
    assert shot["models"]["model"]["status"] == "READY"
    assert {r[0] for r in shot["models"]["model"]["metrics"]} >= {"test_accuracy", "test_loss"}
    mlflow.set_tracking_uri(target)
    loaded = mlflow.pyfunc.load_model(f"models:/mnist@{registry.CHALLENGER}")
    assert loaded.predict(np.zeros((2, 3), "float32")).shape == (2, 10)
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
    return shot, client.calls


def test_the_reference_copy_touches_every_step(reference):
    _, calls = reference
    for step in (
        "create_run", "log_batch", "log_inputs", "create_logged_model", "log_model_artifacts",
        "finalize_logged_model", "log_outputs", "log_artifact", "create_model_version",
        "set_registered_model_alias", "set_terminated",
    ):  # fmt: skip
        assert step in calls, step


# Every k, one copy each: a few minutes on 2 cores.
@pytest.mark.slow
@pytest.mark.parametrize("after", [False, True], ids=["before-the-call", "answer-lost"])
def test_a_fault_at_every_call_ends_in_exactly_the_reference(bench, reference, after):
    expected, calls = reference
    failures = []
    for k in range(1, len(calls) + 1):
        kind = KINDS[(k + after) % len(KINDS)]  # every kind of fault, in turn
        name = f"{k}-{'after' if after else 'before'}-{kind}"
        spool_client, target = bench.restore(name), bench.target(name)
        client = FaultyClient(targets.open_target(target), at=k, after=after, kind=kind)
        # Retried by the same copier (the command's final copy) or a new one (a sync).
        result = _copy_until_complete(spool_client, bench.run_id, target, client, 1 + k % 2)
        if diff := differences(snapshot(target, result.remote_run_id or ""), expected):
            failures.append(f"{name} ({calls[k - 1]}): {diff}")
        elif k % 5 == 0:
            # Copying again (a repeated sync) changes nothing.
            assert RunCopier(spool_client, target, bench.run_id).finish().complete
            if diff := differences(snapshot(target, result.remote_run_id or ""), expected):
                failures.append(f"{name}, copied again: {diff}")
    assert not failures, "\n".join(failures)


# -- sync: one copier per run, a dead writer, runs that cannot be sent ------------------------


def _pending_run(bench: Bench, name: str) -> tuple[MlflowClient, Path, str]:
    """A spool of its own holding the template's run, meant for a fresh target."""
    spool_client, target = bench.restore(name), bench.target(name)
    spool_client.set_tag(bench.run_id, targets.TARGET, target)
    return spool_client, bench.root / "spools" / name, target


def test_a_run_another_process_is_copying_is_left_alone(bench):
    _, folder, target = _pending_run(bench, "locked")
    held = sync.run_lock(bench.run_id, folder)
    held.acquire(timeout=0)  # as a training process in its final copy holds it
    try:
        (result,) = sync.sync(folder)
    finally:
        held.release()
    assert not result.complete
    assert result.error == "its training process or another sync is sending it now"
    assert runs_in(target) == []  # nothing made on the target meanwhile
    (result,) = sync.sync(folder)
    assert result.complete and runs_in(target) == [result.remote_run_id]


def test_a_dead_writers_run_is_sent_and_ended_failed(bench, monkeypatch):
    spool_client, folder, target = _pending_run(bench, "dead")
    spool_client.update_run(bench.run_id, status="RUNNING")
    # Young (the template run is as old as the session: every age counts as young here) and
    # without a lock file: still starting, left alone, and no lock file made by looking.
    monkeypatch.setattr(sync, "STARTING_S", float("inf"))
    for _ in range(2):
        (young,) = sync.sync(folder)
        assert young.error == "it is still running" and runs_in(target) == []
    # Its lock file exists and nobody holds it: its writer is gone.
    left = sync.run_lock(bench.run_id, folder)
    left.acquire(timeout=0)
    left.release()
    (result,) = sync.sync(folder)
    assert result.complete and result.note == sync.DIED
    run = MlflowClient(target).get_run(result.remote_run_id)
    assert run.info.status == "FAILED" and run.data.tags["failure_reason"] == sync.DIED
    assert spool_client.get_run(bench.run_id).info.status == "FAILED"
    assert result.registered_version is None  # a run that did not finish is not registered
    assert sync.sync(folder) == []


@pytest.mark.slow
def test_a_run_that_cannot_be_sent_does_not_stop_the_others(bench, tmp_path, monkeypatch):
    spool_client, folder, target = _pending_run(bench, "two-runs")
    # A second run in the same spool, then the first one's run deleted on the target.
    second = _make_run(targets.spool_uri(folder), bench.root / "reports")
    spool_client.set_tag(second, targets.TARGET, target)
    first = RunCopier(spool_client, target, bench.run_id)
    deleted = first.ensure_remote_run()
    MlflowClient(target).delete_run(deleted)

    monkeypatch.setenv("MNISTFLOW_SPOOL_DIR", str(folder))
    synced = run_cli("sync", "--json")
    assert synced.exit_code == 1 and "Traceback" not in synced.stderr
    results = {r["spool_run_id"]: r for r in synced.json()["synced"]}
    assert results[second]["complete"]
    refused = results[bench.run_id]
    assert not refused["complete"]
    assert refused["error"].startswith(
        f"{target} refuses run {deleted}: it or its experiment was deleted"
    )
    (waiting,) = run_cli("sync", "--list", "--json").json()["pending"]
    assert waiting["spool_run_id"] == bench.run_id  # kept for after the run is restored

    MlflowClient(target).restore_run(deleted)
    again = run_cli("sync", "--json")
    assert again.exit_code == 0, again.stderr
    assert again.json()["synced"][0]["remote_run_id"] == deleted


def runs_in(uri: str) -> list[str]:
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return [r.info.run_id for r in client.search_runs(experiments)]


def test_the_spool_records_no_login_and_sync_logs_in_again():
    recorded = targets.recorded_target("http://carol:pw-1@127.0.0.1:5000")
    assert recorded == "http://carol:***@127.0.0.1:5000"
    # The login given to `sync --tracking-uri` for that store is used; else MLflow's own
    # credentials (MLFLOW_TRACKING_USERNAME/PASSWORD) on the URI without the hidden login.
    assert targets.connect_uri(recorded, "http://carol:pw-1@127.0.0.1:5000") == (
        "http://carol:pw-1@127.0.0.1:5000"
    )
    assert targets.connect_uri(recorded) == "http://127.0.0.1:5000"
    assert targets.connect_uri(recorded, "http://dave:pw-2@127.0.0.1:6000") == (
        "http://127.0.0.1:5000"
    )
    assert targets.connect_uri("sqlite:////data/mlflow.db") == "sqlite:////data/mlflow.db"
