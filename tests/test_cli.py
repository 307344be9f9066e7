"""The command line's error paths: one clear sentence, a non-zero exit, no traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from mlflow.tracking import MlflowClient

from conftest import FAST_ARGS, MNISTFLOW, free_port, made, tool_env, wait_until_up
from mnistflow import data
from mnistflow.lifecycle import networks
from mnistflow.spool.targets import spool_uri


def assert_one_clear_error(result, code: int, *phrases: str) -> None:
    assert result.exit_code == code
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    for phrase in phrases:
        assert phrase in " ".join(result.stderr.split()), result.stderr


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["--preset", "huge"], "'huge' is not one of"),
        (["--epochs", "-1"], "--epochs"),
        (["--members", "0"], "--members"),
        (["--batch-size", "0"], "--batch-size"),
        (["--device", "tpu"], "'tpu' is not one of"),
        (["--tag", "novalue"], "is not KEY=VALUE"),
        (["--lr", "0"], "learning rate must be positive"),
    ],
)
def test_impossible_arguments_are_refused(args: list[str], phrase: str, store: str, cli):
    result = cli("train", *args, "--tracking-uri", store)
    assert_one_clear_error(result, 1 if "lr" in args[0] else 2, phrase)
    assert not Path("mlruns").exists()  # nothing was started


def test_unreachable_tracking_server(store: str, cli):
    # --require-server: else the run goes to the local spool (see test_spool.py).
    uri = f"http://127.0.0.1:{free_port()}"
    result = cli("train", *FAST_ARGS, "--tracking-uri", uri, "--require-server")
    assert_one_clear_error(result, 1, "Cannot reach the MLflow tracking server")


@pytest.mark.slow
def test_unwritable_artifact_location_fails_the_run_before_training(
    store: str, tmp_path: Path, cli
):
    blocker = tmp_path / "a-file"
    blocker.write_text("artifacts cannot live under a file")
    client = MlflowClient(store)
    client.create_experiment("blocked", artifact_location=str(blocker / "artifacts"))
    result = cli("train", *FAST_ARGS, "--tracking-uri", store, "--experiment", "blocked")
    assert_one_clear_error(result, 1, "Cannot write artifacts to")
    (run,) = client.search_runs([client.get_experiment_by_name("blocked").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"].startswith("MnistflowError: Cannot write artifacts")
    assert client.get_metric_history(run.info.run_id, "train_loss") == []  # never trained


def test_missing_data_without_network(store: str, tmp_path: Path, cli, monkeypatch):
    monkeypatch.setenv("MNISTFLOW_MNIST_MIRROR", f"http://127.0.0.1:{free_port()}/")
    monkeypatch.setenv("MNISTFLOW_DATA_DIR", str(tmp_path / "empty-cache"))
    result = cli("train", *FAST_ARGS, "--tracking-uri", store)
    assert_one_clear_error(result, 1, "Could not download", "MNISTFLOW_MNIST_MIRROR")


@pytest.mark.slow
def test_ctrl_c_ends_the_run_as_killed_and_keeps_what_was_logged(store: str, spawn):
    # Many short epochs: Ctrl-C lands mid-training even when this machine is busy.
    limit = 3000  # 23 steps an epoch
    train = ["train", "--epochs", "40", "--limit-train", str(limit), "--tracking-uri", store]
    proc = spawn(
        [*MNISTFLOW, *train],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    # The run is written to the spool first (the store gets it within seconds): the first
    # epoch is seen there, then Ctrl-C is pressed.
    spooled = MlflowClient(spool_uri(Path(os.environ["MNISTFLOW_SPOOL_DIR"])))
    # Generous: on a busy machine the child's start and first epoch take minutes.
    deadline = time.monotonic() + 600
    seen = False
    while time.monotonic() < deadline and proc.poll() is None and not seen:
        time.sleep(0.5)
        runs = spooled.search_runs([e.experiment_id for e in spooled.search_experiments()])
        seen = bool(runs) and "val_accuracy" in runs[0].data.metrics
    assert seen, "the run never reported an epoch"
    proc.send_signal(signal.SIGINT)
    try:
        _, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("training did not stop on Ctrl-C")
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "the training run, if it had started, was ended as KILLED" in " ".join(stderr.split())
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("mnist").experiment_id])
    assert run.info.status == "KILLED"
    run_id = run.info.run_id
    steps = [m.step for m in client.get_metric_history(run_id, "train_loss")]
    assert steps == list(range(len(steps))) and len(steps) >= limit // 128  # in order, none lost
    assert client.get_metric_history(run_id, "val_accuracy")[0].step == 1
    assert len(client.get_metric_history(run_id, "val_accuracy")) < 40  # stopped mid-training


@pytest.mark.server
def test_ui_serves_the_same_store(store: str, spawn, cli, tmp_path: Path):
    result = cli("train", *FAST_ARGS, "--json", "--run-name", "seen-in-the-ui")
    assert result.exit_code == 0, result.stderr
    port = free_port()
    # The server's output goes to a file, not a pipe nobody reads: kept to show on failure.
    log = tmp_path / "ui.log"
    with log.open("w") as sink:
        proc = spawn(
            [*MNISTFLOW, "ui", "--port", str(port)], env=tool_env(), stdout=sink, stderr=sink
        )
    base = f"http://127.0.0.1:{port}"
    experiment_id = result.json()["experiment_id"]
    # Until the store answers, not only /health: the API's first calls open the database.
    # Refused connections and read timeouts are retried alike (a busy machine starts slowly).
    try:
        wait_until_up(
            f"{base}/api/2.0/mlflow/experiments/get?experiment_id={experiment_id}",
            proc,
            timeout=300,
        )
    except RuntimeError as e:
        raise AssertionError(f"{e}; the server printed:\n{log.read_text()[-4000:]}") from e
    runs = requests.post(
        f"{base}/api/2.0/mlflow/runs/search",
        json={"experiment_ids": [experiment_id]},
        timeout=60,
    ).json()["runs"]
    assert [r["info"]["run_name"] for r in runs] == ["seen-in-the-ui"]
    artifacts = requests.get(
        f"{base}/api/2.0/mlflow/artifacts/list",
        params={"run_id": result.json()["run_id"], "path": "reports"},
        timeout=60,
    ).json()["files"]
    assert "reports/confusion_matrix.png" in {f["path"] for f in artifacts}


def test_ui_points_at_the_server_for_http_stores(cli):
    result = cli("ui", "--tracking-uri", "http://127.0.0.1:5999")
    assert result.exit_code == 0 and "serves its own UI" in result.stderr


@pytest.mark.slow
def test_default_store_is_sqlite_in_the_working_directory(store: str, tmp_path: Path, cli):
    result = cli("train", *FAST_ARGS, "--json")
    assert result.exit_code == 0, result.stderr
    assert result.json()["tracking_uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert (tmp_path / "mlflow.db").is_file()
    assert Path(result.json()["artifact_uri"]).is_relative_to(tmp_path / "mlruns")


# -- Ctrl-C says what is true for each command ----------------------------------------------


@pytest.mark.parametrize(
    ("command", "stops", "words"),
    [
        (["predict", "digits.npy"], "mnistflow.inference.batch.collect",
         "prediction stopped; no model or tracking store was changed."),
        (["promote"], "mnistflow.lifecycle.promotion.promote",
         "@champion and @challenger moved only if the decision had been reached"),
        (["register", "0123abcd"], "mnistflow.lifecycle.registry.register",
         "registration may have stopped part-way"),
        (["rollback"], "mnistflow.lifecycle.registry.rollback",
         "the rollback may have stopped part-way"),
        (["serve"], "mnistflow.serving.run", "the server was stopped."),
    ],
)  # fmt: skip
@pytest.mark.slow
def test_ctrl_c_outside_training_says_what_it_left(
    command: list[str], stops: str, words: str, store: str, cli, monkeypatch
):
    made(store)  # the store exists
    np.save("digits.npy", np.zeros((1, 28, 28), np.uint8))

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(stops, interrupted)
    result = cli(*command, "--tracking-uri", store)
    assert_one_clear_error(result, 130, "Interrupted: " + words)
    assert "KILLED" not in result.stderr  # there was no training run to end


# -- no command makes a store the user did not ask for --------------------------------------


@pytest.mark.slow
def test_train_elsewhere_leaves_the_working_directory_alone(tmp_path: Path, cli, monkeypatch):
    """Also the smallest run: 500 images, 1 epoch, 4 steps (a ZeroDivisionError in the
    one-cycle schedule before)."""
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(here)
    uri = f"sqlite:///{elsewhere / 'x.db'}"
    result = cli(
        "train", "--limit-train", "500", "--epochs", "1", "--no-system-metrics",
        "--tracking-uri", uri, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert list(here.iterdir()) == []  # no ./mlflow.db, no ./mlruns
    assert Path(result.json()["artifact_uri"]).is_relative_to(elsewhere / "mlruns")
    run = MlflowClient(uri).get_run(result.json()["run_id"])
    assert run.info.status == "FINISHED"
    assert [m.step for m in MlflowClient(uri).get_metric_history(run.info.run_id, "lr")] == [
        0, 1, 2, 3
    ]  # fmt: skip


@pytest.mark.parametrize(
    "command",
    [
        ["register", "0123abcd"],
        ["rollback"],
        ["promote"],
        ["predict", "digits.npy"],
        ["serve"],
        ["ui"],
    ],
)
def test_commands_that_need_a_store_do_not_create_an_empty_one(
    command: list[str], tmp_path: Path, cli, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    np.save("digits.npy", np.zeros((1, 28, 28), np.uint8))
    result = cli(*command)  # the default store, ./mlflow.db, does not exist
    assert_one_clear_error(
        result, 1, f"There is no MLflow store at {tmp_path / 'mlflow.db'}; train a model first"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits.npy"]


# -- the whole job --------------------------------------------------------------------------


@pytest.mark.slow
def test_a_pipeline_whose_first_model_is_refused_ends_with_the_decision(store: str, cli):
    """No model of the name is champion and the new one falls short of the floor: the
    pipeline says so and why (exit 0, its decision is the outcome), with no sample digits
    to classify, instead of failing to load a champion that does not exist."""
    args = ["pipeline", "--limit-train", "2000", "--epochs", "1", "--min-accuracy", "0.9999",
            "--tracking-uri", store]  # fmt: skip
    result = cli(*args, "--json")
    assert result.exit_code == 0, result.stderr
    outcome = result.json()
    assert outcome["promotion"]["promoted"] is False and outcome["samples"] is None
    assert "below the minimum 0.9999" in outcome["promotion"]["reason"]
    assert outcome["promotion"]["champion_version"] is None
    assert "champion" not in MlflowClient(store).get_registered_model("mnist").aliases
    shown = cli(*args)
    assert shown.exit_code == 0, shown.stderr
    assert "has no @champion to answer them yet" in " ".join(shown.stderr.split())


@pytest.mark.slow
def test_pipeline_loads_mnist_once_and_takes_an_ensemble_whole(
    store: str, tmp_path: Path, cli, monkeypatch
):
    """The quality preset's shape (here 2 members of 1 epoch): trained, registered, promoted
    and asked for the sample digits as one model, on MNIST loaded once."""
    loads: list[object] = []
    load = data.load

    def counted(config: object) -> data.MnistSplits:
        loads.append(config)
        return load(config)  # type: ignore[arg-type]

    monkeypatch.setattr(data, "load", counted)
    result = cli(
        "pipeline", "--preset", "quality", "--members", "2", "--limit-train", "2000", "--epochs",
        "1", "--min-accuracy", "0.5", "--min-writers-accuracy", "0.5", "--tracking-uri", store,
        "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    outcome = result.json()
    client = MlflowClient(store)
    params = client.get_run(outcome["train"]["run_id"]).data.params
    assert (params["preset"], params["train.members"]) == ("quality", "2")
    # The logged checkpoint says how to rebuild the ensemble around its weights.
    saved = torch.load(
        client.download_artifacts(outcome["train"]["run_id"], "weights/model.pt", str(tmp_path)),
        weights_only=True,
    )
    rebuilt = networks.build(saved["arch"], saved["members"])
    rebuilt.load_state_dict(saved["state_dict"])
    # ... with its members' temperatures, fitted on validation and logged beside the rest.
    metrics = client.get_run(outcome["train"]["run_id"]).data.metrics
    logged = [metrics["member_0_temperature"], metrics["member_1_temperature"]]
    assert rebuilt.temperatures.tolist() == pytest.approx(logged) and 1.0 not in logged
    assert len(loads) == 1  # training, the promotion's evaluation and the samples share it
    assert outcome["train"]["registered_version"] == "1"
    assert outcome["promotion"]["promoted"] is True
    assert outcome["promotion"]["champion_version"] == "1"
    assert outcome["samples"]["true"] == [int(x) for x in load(loads[0]).test.labels[:10]]
    assert len(list((tmp_path / "sample-digits").glob("*.png"))) == 10
