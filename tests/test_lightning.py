"""The Lightning engine: one autologged run with our additions, the same lifecycle as the plain
engine, DDP on two CPU processes, resume into the same run, the same errors."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from mlflow.tracking import MlflowClient

from conftest import MNISTFLOW, assert_abstention_logged, free_port, run_cli
from mnistflow import data
from mnistflow.config import DataConfig
from mnistflow.engines import lightning as lightning_train
from mnistflow.engines.plain import evaluate
from mnistflow.lifecycle import networks as models
from mnistflow.recording import TrainSummary

LIMIT, EPOCHS = 2000, 2
STEPS_PER_EPOCH = -(-LIMIT // 128)
ARGS = ["--engine", "lightning", "--limit-train", str(LIMIT), "--epochs", str(EPOCHS)]
ARGS += ["--no-system-metrics", "--json"]


def only_run(client: MlflowClient) -> Any:
    """The single training run in the store (promotion's evaluation runs left aside)."""
    experiments = [
        e.experiment_id for e in client.search_experiments() if e.name != "mnist-promotion"
    ]
    runs = client.search_runs(experiments)
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def full_test_accuracy(client: MlflowClient, run_id: str, tmp: Path) -> float:
    """The logged weights evaluated on the whole test set in this process."""
    path = client.download_artifacts(run_id, "weights/model.pt", str(tmp))
    saved = torch.load(path, weights_only=False)
    network = models.build(saved["arch"])
    network.load_state_dict(saved["state_dict"])
    test = data.load(DataConfig(limit_train=10)).test
    return evaluate(network, test).accuracy


@pytest.fixture(scope="module")
def lightning(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MlflowClient, dict]]:
    """One small Lightning run, registered, as a user would start it."""
    folder = tmp_path_factory.mktemp("lightning")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        result = run_cli("train", *ARGS, "--register", "--model-name", "lit", "--tag", "k=v")
    assert result.exit_code == 0, result.stderr
    yield MlflowClient(uri), result.json()


def test_one_run_holds_autologs_records_and_ours(lightning):
    client, summary = lightning
    run = only_run(client)
    assert run.info.run_id == summary["run_id"] and run.info.status == "FINISHED"
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    # Autolog's: epochs and the optimiser's settings, per-step and per-epoch metrics, summary.
    assert params["epochs"] == str(EPOCHS) and params["optimizer_name"] == "AdamW"
    assert float(params["lr"]) == pytest.approx(8e-3)
    assert tags["Mode"] == "training"
    total = EPOCHS * STEPS_PER_EPOCH
    # Lightning's global step counts finished optimiser steps: 1 .. total.
    assert steps(client, run.info.run_id, "train_loss") == list(range(1, total + 1))
    assert steps(client, run.info.run_id, "lr") == list(range(1, total + 1))
    for key in ("val_accuracy", "val_loss", "epoch_train_loss", "epoch_seconds"):
        assert steps(client, run.info.run_id, key) == list(range(EPOCHS)), key
    history = client.get_metric_history(run.info.run_id, "epoch_train_loss")
    assert history[-1].value < history[0].value  # it learned
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "model_summary.txt" in artifacts
    # Ours: resolved config, tags, dataset inputs, reports, test metrics, checkpoints, models.
    assert params["preset"] == "fast" and params["train.lr"] == "0.008"
    assert params["engine.name"] == "lightning" and params["data.train_size"] == str(LIMIT)
    assert tags["engine"] == "lightning" and tags["world_size"] == "1" and tags["k"] == "v"
    assert tags["git_commit"] and tags["dataset_digest"] == data.DATASET_DIGEST
    assert sorted(i.dataset.name for i in run.inputs.dataset_inputs) == [
        "mnist-test", "mnist-train", "mnist-validation",
    ]  # fmt: skip
    assert {"config.json", "reports", "weights", "checkpoints"} <= artifacts
    reports = {a.path for a in client.list_artifacts(run.info.run_id, "reports")}
    assert "reports/learning_curves.png" in reports and "reports/confusion_matrix.png" in reports
    checkpoints = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert checkpoints == {"checkpoints/best.ckpt", "checkpoints/last.ckpt"}
    assert metrics["test_accuracy"] == pytest.approx(summary["test_accuracy"])
    assert metrics["test_accuracy"] > 0.8
    assert steps(client, run.info.run_id, "test_accuracy") == [0]  # once, not also by autolog
    assert "test_macro_f1" in metrics and "onnx_max_abs_diff" in metrics
    assert_abstention_logged(client, run.info.run_id)
    logged = client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
    )
    # Autolog's own model is off: exactly one `model` (the served pyfunc) and our torch model.
    assert sorted(m.name for m in logged) == ["model", "pytorch"]
    assert (
        summary["model_uri"] == f"models:/{next(m.model_id for m in logged if m.name == 'model')}"
    )


def test_json_line_has_the_plain_engines_keys(lightning):
    _, summary = lightning
    assert list(summary) == [f.name for f in dataclasses.fields(TrainSummary)]
    assert 0 < summary["train_seconds"] < summary["total_seconds"]


def test_register_promote_predict_a_lightning_run(lightning, tmp_path: Path, monkeypatch):
    client, summary = lightning
    monkeypatch.setenv("MLFLOW_TRACKING_URI", client.tracking_uri)
    assert summary["registered_model"] == "lit" and summary["registered_version"] == "1"
    again = run_cli("register", summary["run_id"], "--model-name", "lit", "--json")
    assert again.exit_code == 0, again.stderr
    version = client.get_model_version("lit", again.json()["version"])
    # Our served pyfunc, not a torch flavour (the source is its artifact location).
    served = client.get_logged_model(summary["model_uri"].removeprefix("models:/"))
    assert version.source == served.artifact_location
    promoted = run_cli(
        "promote", "--model-name", "lit", "--min-accuracy", "0.8",
        "--min-writers-accuracy", "0.5", "--json",
    )  # fmt: skip
    assert promoted.exit_code == 0 and promoted.json()["promoted"] is True, promoted.stdout
    test = data.load(DataConfig(limit_train=10)).test
    np.save(tmp_path / "digits.npy", test.images[:20, 0].numpy())
    out = tmp_path / "labels.json"
    predicted = run_cli(
        "predict", str(tmp_path / "digits.npy"), "--model-uri", "models:/lit@champion",
        "--output", str(out),
    )  # fmt: skip
    assert predicted.exit_code == 0, predicted.stderr
    assert out.read_text().count('"label"') == 20


class InterruptAtEpoch(pl.Callback):
    """Ctrl-C as the given epoch starts, once the previous one is logged and checkpointed."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_ctrl_c_kills_the_run_and_resume_continues_it(store: str, monkeypatch):
    fit = lightning_train.fit

    def interrupted_fit(*args: Any, **kwargs: Any) -> Any:
        kwargs["callbacks"] = [InterruptAtEpoch(1)]
        return fit(*args, **kwargs)

    monkeypatch.setattr(lightning_train, "fit", interrupted_fit)
    first = run_cli("train", *ARGS, "--tracking-uri", store)
    assert first.exit_code == 130, first.stderr
    assert "Traceback" not in first.stderr and "KILLED" in first.stderr
    client = MlflowClient(store)
    run_id = only_run(client).info.run_id
    assert client.get_run(run_id).info.status == "KILLED"
    assert steps(client, run_id, "train_loss") == list(range(1, STEPS_PER_EPOCH + 1))
    assert steps(client, run_id, "val_accuracy") == [0]

    monkeypatch.setattr(lightning_train, "fit", fit)
    resumed = run_cli(
        "train", "--engine", "lightning", "--resume", run_id, "--tracking-uri", store, "--json"
    )
    assert resumed.exit_code == 0, resumed.stderr
    assert resumed.json()["run_id"] == run_id
    run = only_run(client)
    assert run.info.status == "FINISHED"
    # Steps carry on where they stopped: none repeated, none restarted at 0.
    total = EPOCHS * STEPS_PER_EPOCH
    assert steps(client, run_id, "train_loss") == list(range(1, total + 1))
    assert steps(client, run_id, "val_accuracy") == list(range(EPOCHS))
    assert steps(client, run_id, "test_accuracy") == [0]


@pytest.mark.slow
def test_ddp_on_two_processes_gives_one_run_with_reduced_metrics(store: str, tmp_path: Path, spawn):
    proc = spawn(
        [*MNISTFLOW, "train", *ARGS, "--devices", "2", "--tracking-uri", store],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert stdout.count('"run_id"') == 1  # only rank 0 reports
    client = MlflowClient(store)
    run = only_run(client)  # rank 1 never started a run (it cannot reach any store)
    assert run.data.tags["world_size"] == "2" and run.data.params["engine.devices"] == "2"
    # Each rank takes half of every 128-image step: the same number of steps as one process.
    total = EPOCHS * STEPS_PER_EPOCH
    assert steps(client, run.info.run_id, "train_loss") == list(range(1, total + 1))
    assert steps(client, run.info.run_id, "val_accuracy") == list(range(EPOCHS))
    # Test accuracy reduced over the two halves of the test set equals the whole set's.
    whole = full_test_accuracy(client, run.info.run_id, tmp_path)
    assert run.data.metrics["test_accuracy"] == pytest.approx(whole, abs=1e-6)
    assert not (tmp_path / "lightning_logs").exists()


@pytest.mark.parametrize(
    ("args", "code", "phrase"),
    [
        (["--devices", "0"], 2, "--devices"),
        (["--engine", "plain", "--resume", "abc"], 2, "needs --engine lightning"),
        (["--engine", "plain", "--devices", "2"], 2, "needs --engine lightning"),
        (["--resume", "0123456789abcdef0123456789abcdef"], 1, "No run with id"),
        (["--members", "2"], 1, "The Lightning engine trains one network"),
    ],
)
@pytest.mark.slow
def test_bad_flags_get_one_sentence(args: list[str], code: int, phrase: str, store: str):
    engine = [] if "--engine" in args else ["--engine", "lightning"]
    result = run_cli("train", *engine, *args, "--tracking-uri", store)
    assert result.exit_code == code
    assert "Traceback" not in result.stderr + result.stdout
    assert phrase in " ".join(result.stderr.split()), result.stderr


def test_unreachable_store_fails_before_training(store: str):
    uri = f"http://127.0.0.1:{free_port()}"
    result = run_cli("train", *ARGS, "--tracking-uri", uri, "--require-server")
    assert result.exit_code == 1 and "Cannot reach the MLflow tracking server" in result.stderr


@pytest.mark.slow
def test_tracking_uri_from_env_else_sqlite_in_working_directory(
    store: str, tmp_path: Path, monkeypatch
):
    small = ["--engine", "lightning", "--limit-train", "300", "--epochs", "1"]
    small += ["--no-system-metrics", "--json"]
    default = run_cli("train", *small)
    assert default.exit_code == 0, default.stderr
    assert default.json()["tracking_uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert Path(default.json()["artifact_uri"]).is_relative_to(tmp_path / "mlruns")

    other = f"sqlite:///{tmp_path / 'other.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    from_env = run_cli("train", *small)
    assert from_env.exit_code == 0, from_env.stderr
    assert from_env.json()["tracking_uri"] == other
    only_run(MlflowClient(other))
    assert not (tmp_path / "lightning_logs").exists()  # no Lightning logger files either
