"""mnistflow as an MLflow Project: `mlflow run` and `mlflow.projects.run` give exactly one run,
the one MLflow starts, holding both the project's tags and everything mnistflow logs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import mlflow.projects
import pytest
from mlflow.exceptions import ExecutionException
from mlflow.tracking import MlflowClient

from conftest import ROOT, made, tool_env

# One epoch on 1,000 images: the point is the run's shape, not its accuracy.
TRAIN = {"epochs": "1", "limit_train": "1000", "system_metrics": "false"}
MLFLOW = [sys.executable, "-m", "mlflow"]


def git_available() -> bool:
    return shutil.which("git") is not None and (ROOT / ".git").exists()


@pytest.fixture
def project_store(store: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The temp store for the parent and, through MLflow, for the entry point it starts; the
    venv's bin on PATH, because MLflow runs the entry point's `python` by name."""
    made(store)  # MLflow's tables in place: its migrations would cost every test 3.5 s of CPU
    for key, value in tool_env(MLFLOW_TRACKING_URI=store).items():
        monkeypatch.setenv(key, value)
    # mlflow.set_experiment() in an earlier in-process test exports its experiment's id;
    # `mlflow run --experiment-name` refuses to run with both.
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    mlflow.set_tracking_uri(store)
    return store


def mlflow_run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`mlflow run ...` as a user types it; its children share its process group."""
    return subprocess.run(
        [*MLFLOW, "run", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def params_args(params: dict[str, str]) -> list[str]:
    return [arg for key, value in params.items() for arg in ("-P", f"{key}={value}")]


def the_one_run(store: str, experiment: str) -> mlflow.entities.Run:
    client = MlflowClient(store)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment}"
    runs = client.search_runs([found.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def assert_complete_training_run(
    store: str, run: mlflow.entities.Run, entry_point: str = "train"
) -> None:
    """MLflow's project tags and mnistflow's params, metrics, artifacts and model."""
    client = MlflowClient(store)
    tags = run.data.tags
    assert run.info.status == "FINISHED"
    assert tags["mlflow.project.entryPoint"] == entry_point
    assert tags["mlflow.source.type"] == "PROJECT"
    assert len(tags["mlflow.source.git.commit"]) == 40
    assert tags["mlflow.source.name"]
    assert run.data.params["train.epochs"] == "1"
    assert run.data.params["data.train_size"] == "1000"
    assert "test_accuracy" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "reports", "weights"} <= artifacts
    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}' AND name = 'model'",
    )
    assert len(models) == 1


@pytest.mark.slow
def test_mlflow_run_from_the_checkout_is_one_complete_run(project_store: str):
    result = mlflow_run(
        str(ROOT), "-e", "train", *params_args(TRAIN), "--env-manager", "local",
        "--experiment-name", "project-checkout",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run = the_one_run(project_store, "project-checkout")
    assert_complete_training_run(project_store, run)
    assert run.data.tags["mlflow.source.name"] == ROOT.resolve().as_uri()


@pytest.mark.slow
@pytest.mark.skipif(not git_available(), reason="needs git and a git checkout")
def test_mlflow_run_from_a_git_clone_at_a_commit(project_store: str, tmp_path: Path):
    """--version checks out that commit: a later commit that breaks `train` is not run."""
    clone = tmp_path / "clone"
    git = ["git", "-C", str(clone), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    good = subprocess.run(
        [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    mlproject = clone / "MLproject"
    mlproject.write_text(mlproject.read_text().replace("mnistflow train", "mnistflow no-such"))
    subprocess.run([*git, "commit", "-qam", "break train"], check=True)

    result = mlflow_run(
        str(clone), "--version", good, "-e", "train", *params_args(TRAIN),
        "--env-manager", "local", "--experiment-name", "project-clone",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run = the_one_run(project_store, "project-clone")
    assert_complete_training_run(project_store, run)
    assert run.data.tags["mlflow.source.git.commit"] == good
    assert run.data.tags["mlflow.source.name"] == clone.as_uri()


@pytest.mark.slow
def test_projects_run_synchronous(project_store: str):
    submitted = mlflow.projects.run(
        str(ROOT),
        entry_point="train",
        # A parameter left at its "" default is not passed; a given one reaches the run.
        parameters={**TRAIN, "precision": "fp32"},
        env_manager="local",
        experiment_name="project-sync",
    )
    assert submitted.get_status() == "FINISHED"
    run = the_one_run(project_store, "project-sync")
    assert run.info.run_id == submitted.run_id
    assert_complete_training_run(project_store, run)
    assert run.data.params["train.precision"] == "fp32"


@pytest.mark.slow
def test_projects_run_asynchronous_then_wait(project_store: str):
    submitted = mlflow.projects.run(
        str(ROOT),
        entry_point="train",
        parameters=TRAIN,
        env_manager="local",
        experiment_name="project-async",
        synchronous=False,
    )
    try:
        assert submitted.wait() is True
    finally:
        submitted.cancel()  # a no-op once it has ended; reaps it if an assertion failed
    run = the_one_run(project_store, "project-async")
    assert run.info.run_id == submitted.run_id
    assert_complete_training_run(project_store, run)


def test_unknown_entry_point_gets_mlflows_error_and_no_run(project_store: str):
    with pytest.raises(ExecutionException, match="Could not find nope among entry points"):
        mlflow.projects.run(str(ROOT), entry_point="nope", env_manager="local")
    client = MlflowClient(project_store)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_a_missing_parameter_gets_mlflows_error_and_no_run(project_store: str):
    with pytest.raises(ExecutionException, match="No value given for missing parameters: 'inputs'"):
        mlflow.projects.run(
            str(ROOT), entry_point="predict", env_manager="local", experiment_name="project-miss"
        )
    client = MlflowClient(project_store)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


@pytest.mark.slow
def test_a_failed_project_run_ends_failed_with_the_reason(project_store: str):
    """MLflow checks no number types; our CLI does, and the run ends FAILED, saying why."""
    result = mlflow_run(
        str(ROOT), "-e", "train", *params_args({**TRAIN, "lr": "-1"}),
        "--env-manager", "local", "--experiment-name", "project-failed",
    )  # fmt: skip
    assert result.returncode != 0
    assert "learning rate must be positive, got -1.0." in result.stderr
    run = the_one_run(project_store, "project-failed")
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"] == "learning rate must be positive, got -1.0."


@pytest.mark.slow
def test_predict_of_a_missing_path_ends_failed_with_the_reason(project_store: str):
    result = mlflow_run(
        str(ROOT), "-e", "predict", "-P", "inputs=/no/such/digits", "--env-manager", "local",
        "--experiment-name", "project-predict",
    )  # fmt: skip
    assert result.returncode != 0
    run = the_one_run(project_store, "project-predict")
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"] == "/no/such/digits does not exist."
