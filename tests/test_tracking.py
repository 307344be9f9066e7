"""A finished run, read back through MlflowClient: everything the issue lists is there."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from conftest import FAST_ARGS, run_cli
from mnistflow.data import DATASET_DIGEST

STEPS_PER_EPOCH = -(-2000 // 128)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MlflowClient, dict]]:
    """One small run with tags, a description and system metrics, as a user would start it."""
    folder = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        result = run_cli(
            "train", "--limit-train", "2000", "--epochs", "2",
            "--tracking-uri", uri, "--experiment", "tests", "--run-name", "smoke",
            "--description", "A **small** run for the tests.",
            "--tag", "team=core", "--tag", "purpose=ci", "--json",
        )  # fmt: skip
        assert result.exit_code == 0, result.stderr
        yield MlflowClient(uri), result.json()


def test_json_line_has_the_promised_fields(tracked):
    _, summary = tracked
    for key in ("run_id", "experiment_id", "tracking_uri", "test_accuracy"):
        assert summary[key]
    assert 0 < summary["train_seconds"] < summary["total_seconds"]
    assert summary["tracking_uri"].startswith("sqlite:///")


def test_run_has_name_description_status(tracked):
    client, summary = tracked
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "smoke"
    assert run.data.tags["mlflow.note.content"] == "A **small** run for the tests."
    assert client.get_experiment(run.info.experiment_id).name == "tests"


def test_params_hold_the_resolved_config(tracked):
    client, summary = tracked
    params = client.get_run(summary["run_id"]).data.params
    assert params["preset"] == "fast"
    assert params["train.epochs"] == "2"
    assert params["train.batch_size"] == "128"
    assert params["train.lr"] == "0.008"
    assert params["train.seed"] == "0"
    assert params["train.device"] == "cpu"  # resolved, never "auto"
    assert params["data.train_size"] == "2000"
    assert params["data.val_size"] == "5000"
    assert params["data.test_size"] == "10000"
    assert params["data.limit_train"] == "2000"


def test_tags_say_how_the_run_was_made(tracked):
    client, summary = tracked
    tags = client.get_run(summary["run_id"]).data.tags
    assert tags["team"] == "core" and tags["purpose"] == "ci"
    assert tags["preset"] == "fast" and tags["device"] == "cpu"
    assert tags["dataset_digest"] == DATASET_DIGEST
    assert tags["mlflow_version"] == mlflow.__version__
    assert tags["torch_version"].startswith("2.")
    assert len(tags["git_commit"]) == 40 or tags["git_commit"] == "unknown"
    assert tags["git_dirty"] in ("true", "false", "unknown")


def test_step_and_epoch_metric_histories(tracked):
    client, summary = tracked
    run_id = summary["run_id"]
    total = 2 * STEPS_PER_EPOCH
    for key in ("train_loss", "lr"):
        history = client.get_metric_history(run_id, key)
        assert [m.step for m in history] == list(range(total)), key
        timestamps = [m.timestamp for m in history]
        assert timestamps == sorted(timestamps)
    for key in ("epoch_train_loss", "epoch_train_accuracy", "val_loss", "val_accuracy"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [1, 2], key
    metrics = client.get_run(run_id).data.metrics
    assert metrics["epoch_seconds"] > 0 and metrics["images_per_second"] > 0
    assert metrics["test_accuracy"] == pytest.approx(summary["test_accuracy"])
    assert 0.8 < metrics["test_macro_f1"] <= 1
    assert all(0 <= metrics[f"test_accuracy_digit_{d}"] <= 1 for d in range(10))
    assert metrics["train_seconds"] == pytest.approx(summary["train_seconds"])


def test_system_metrics_are_recorded(tracked):
    client, summary = tracked
    metrics = client.get_run(summary["run_id"]).data.metrics
    assert "system/cpu_utilization_percentage" in metrics
    assert "system/system_memory_usage_megabytes" in metrics


def test_every_artifact_is_there(tracked, tmp_path: Path):
    client, summary = tracked
    run_id = summary["run_id"]
    names = {a.path for a in client.list_artifacts(run_id)}
    names |= {a.path for a in client.list_artifacts(run_id, "reports")}
    names |= {a.path for a in client.list_artifacts(run_id, "weights")}
    assert {
        "config.json",
        "reports/confusion_matrix.png",
        "reports/misclassified.png",
        "reports/learning_curves.png",
        "reports/per_class.json",
        "reports/per_class.csv",
        "weights/model.pt",
    } <= names
    local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=str(tmp_path)))
    config = json.loads((local / "config.json").read_text())
    assert config["train"]["preset"] == "fast" and config["data"]["train_size"] == 2000
    per_class = json.loads((local / "reports" / "per_class.json").read_text())
    assert sum(per_class[str(d)]["support"] for d in range(10)) == 10000
    assert (local / "reports" / "per_class.csv").read_text().startswith("digit,precision")
    for png in ("confusion_matrix", "misclassified", "learning_curves"):
        assert (local / "reports" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"


def test_dataset_inputs_give_lineage(tracked):
    client, summary = tracked
    inputs = client.get_run(summary["run_id"]).inputs.dataset_inputs
    by_context = {
        {t.key: t.value for t in i.tags}["mlflow.data.context"]: i.dataset for i in inputs
    }
    assert set(by_context) == {"train", "validation", "test"}
    assert by_context["train"].name == "mnist-train"
    assert by_context["train"].digest != by_context["test"].digest
    assert "mnist" in by_context["test"].source


@pytest.mark.parametrize("mode", ["--sync-logging", "--async-logging"])
def test_sync_and_async_logging_lose_nothing(mode: str, store: str, cli):
    result = cli("train", *FAST_ARGS, "--tracking-uri", store, mode, "--json")
    assert result.exit_code == 0, result.stderr
    client = MlflowClient(store)
    history = client.get_metric_history(result.json()["run_id"], "train_loss")
    assert [m.step for m in history] == list(range(2 * STEPS_PER_EPOCH))
