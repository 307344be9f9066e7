"""The command line's error paths: one clear sentence, a non-zero exit, no traceback."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient

from conftest import FAST_ARGS, MNISTFLOW, free_port, tool_env


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
    result = cli("train", *FAST_ARGS, "--tracking-uri", f"http://127.0.0.1:{free_port()}")
    assert_one_clear_error(result, 1, "Cannot reach the MLflow tracking server")


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


def test_ctrl_c_ends_the_run_as_killed_and_keeps_what_was_logged(store: str, spawn):
    proc = spawn(
        [*MNISTFLOW, "train", "--limit-train", "20000", "--epochs", "5", "--tracking-uri", store],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    client = MlflowClient(store)
    deadline = time.monotonic() + 120
    run_id = None
    # Wait until the first epoch's metrics are in the store, then press Ctrl-C.
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
        experiment = client.get_experiment_by_name("mnist")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        if runs and "val_accuracy" in runs[0].data.metrics:
            run_id = runs[0].info.run_id
            break
    assert run_id, "the run never reported an epoch"
    proc.send_signal(signal.SIGINT)
    try:
        _, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("training did not stop on Ctrl-C")
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "KILLED" in stderr
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    steps = [m.step for m in client.get_metric_history(run_id, "train_loss")]
    assert steps == list(range(len(steps))) and len(steps) >= 20000 // 128  # in order, none lost
    assert client.get_metric_history(run_id, "val_accuracy")[0].step == 1


def test_ui_serves_the_same_store(store: str, spawn, cli):
    result = cli("train", *FAST_ARGS, "--json", "--run-name", "seen-in-the-ui")
    assert result.exit_code == 0, result.stderr
    port = free_port()
    proc = spawn([*MNISTFLOW, "ui", "--port", str(port)], env=tool_env())
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        with contextlib.suppress(requests.ConnectionError):
            if requests.get(f"{base}/health", timeout=1).ok:
                break
        time.sleep(0.5)
    else:
        pytest.fail("mnistflow ui did not start")
    runs = requests.post(
        f"{base}/api/2.0/mlflow/runs/search",
        json={"experiment_ids": [result.json()["experiment_id"]]},
        timeout=10,
    ).json()["runs"]
    assert [r["info"]["run_name"] for r in runs] == ["seen-in-the-ui"]
    artifacts = requests.get(
        f"{base}/api/2.0/mlflow/artifacts/list",
        params={"run_id": result.json()["run_id"], "path": "reports"},
        timeout=10,
    ).json()["files"]
    assert "reports/confusion_matrix.png" in {f["path"] for f in artifacts}


def test_ui_points_at_the_server_for_http_stores(cli):
    result = cli("ui", "--tracking-uri", "http://127.0.0.1:5999")
    assert result.exit_code == 0 and "serves its own UI" in result.stderr


def test_default_store_is_sqlite_in_the_working_directory(store: str, tmp_path: Path, cli):
    result = cli("train", *FAST_ARGS, "--json")
    assert result.exit_code == 0, result.stderr
    assert result.json()["tracking_uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert (tmp_path / "mlflow.db").is_file()
    assert Path(result.json()["artifact_uri"]).is_relative_to(tmp_path / "mlruns")
