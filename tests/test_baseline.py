"""The scikit-learn baseline: one autologged run that is also a complete mnistflow run, whose
served model goes through the same registry, promotion gate and predict path as the CNN's."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
from fastapi.testclient import TestClient
from mlflow.tracking import MlflowClient
from mlflow.utils.autologging_utils import autologging_is_disabled

from conftest import assert_abstention_logged, run_cli
from mnistflow import data
from mnistflow.config import DataConfig
from mnistflow.lifecycle import registry
from mnistflow.serving import ServeConfig, create_app
from mnistflow.serving.model import ModelFollower

EXPERIMENT = "baseline-tests"


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One baseline run on 2,000 training images in its own store."""
    folder = tmp_path_factory.mktemp("baseline")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        result = run_cli(
            "baseline", "--limit-train", "2000", "--no-system-metrics", "--json",
            "--tracking-uri", uri, "--experiment", EXPERIMENT, "--run-name", "linear",
            "--tag", "team=digits", "--description", "the linear baseline",
        )  # fmt: skip
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
    assert result.exit_code == 0, result.stderr
    return {"uri": uri, "summary": result.json(), "folder": folder}


def test_json_has_the_keys_of_train(baseline):
    summary = baseline["summary"]
    assert set(summary) == {
        "run_id", "experiment_id", "tracking_uri", "artifact_uri", "preset", "device",
        "test_accuracy", "test_macro_f1", "train_seconds", "total_seconds", "model_uri",
        "registered_model", "registered_version", "spooled", "spool_reason",
    }  # fmt: skip
    assert summary["preset"] == "baseline"
    # A linear model on 2,000 digits: clearly learned, clearly below the CNN.
    assert 0.8 < summary["test_accuracy"] < 0.97


def test_autolog_logs_into_our_run_and_opens_no_other(baseline):
    client = MlflowClient(baseline["uri"])
    summary = baseline["summary"]
    runs = client.search_runs([summary["experiment_id"]])
    assert [r.info.run_id for r in runs] == [summary["run_id"]]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "linear"
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    # Autolog's own records: the estimator's params, its training metrics and tags.
    assert params["pca__n_components"] == "50"
    assert params["classify__C"] == "1.0"
    assert {"training_accuracy_score", "training_log_loss", "training_f1_score"} <= set(metrics)
    assert tags["estimator_name"] == "Pipeline"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"estimator.html", "training_confusion_matrix.png"} <= artifacts
    # Ours, in the same run: the CNN runs' metric names, tags, description, reports.
    assert params["preset"] == "baseline"
    assert {"val_accuracy", "test_accuracy", "test_macro_f1", "train_seconds"} <= set(metrics)
    assert {f"test_accuracy_digit_{d}" for d in range(10)} <= set(metrics)
    assert metrics["test_accuracy"] == pytest.approx(summary["test_accuracy"])
    assert_abstention_logged(client, run.info.run_id)
    assert tags["trainer"] == "scikit-learn" and tags["team"] == "digits"
    assert tags["mlflow.note.content"] == "the linear baseline"
    assert "git_commit" in tags and "dataset_digest" in tags
    reports = {a.path for a in client.list_artifacts(run.info.run_id, "reports")}
    assert {"reports/confusion_matrix.png", "reports/misclassified.png"} <= reports
    assert "reports/per_class.json" in reports
    contexts = {
        tag.value
        for i in run.inputs.dataset_inputs
        for tag in i.tags
        if tag.key == "mlflow.data.context"
    }
    assert {"train", "validation", "test"} <= contexts
    # Autolog is switched off again once the baseline is fitted.
    assert autologging_is_disabled("sklearn")


def test_served_model_has_the_cnn_contract_and_agrees_with_autologs_model(baseline):
    client = MlflowClient(baseline["uri"])
    summary = baseline["summary"]
    models = client.search_logged_models(
        experiment_ids=[summary["experiment_id"]],
        filter_string=f"source_run_id = '{summary['run_id']}'",
    )
    by_name = {m.name: m for m in models}
    assert set(by_name) == {"model", "sklearn"}
    assert summary["model_uri"] == f"models:/{by_name['model'].model_id}"
    mlflow.set_tracking_uri(baseline["uri"])
    info = mlflow.models.get_model_info(summary["model_uri"])
    assert info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 28, 28)
    outputs = [c["name"] for c in info.signature.outputs.to_dict()]
    assert outputs == ["label", "probabilities", "confidence", "abstain"]

    test = data.load(DataConfig(limit_train=100)).test
    pixels = test.images[:300].numpy().astype(np.float32)  # (300, 1, 28, 28) 0-255
    served = mlflow.pyfunc.load_model(summary["model_uri"]).predict(pixels[:, 0])
    fitted = mlflow.sklearn.load_model(f"models:/{by_name['sklearn'].model_id}")
    expected = fitted.predict_proba(pixels.reshape(300, 784))
    np.testing.assert_array_equal(served["label"].to_numpy(), expected.argmax(1))
    np.testing.assert_allclose(np.stack(served["probabilities"]), expected, atol=1e-4)


def test_baseline_is_registered_and_refused_by_the_floor(registered, tmp_path: Path, cli):
    """Registered like any run, predicted like any model, and kept from @champion."""
    uri, runs = registered
    name = "baseline-gate"
    client = MlflowClient(uri)
    mlflow.set_tracking_uri(uri)
    registry.register(client, runs["good"]["run_id"], name)
    registry.make_champion(client, name, "1", "test: the CNN is champion")

    fitted = cli(
        "baseline", "--limit-train", "1000", "--no-system-metrics", "--json",
        "--tracking-uri", uri, "--experiment", EXPERIMENT,
        "--register", "--model-name", name,
    )  # fmt: skip
    assert fitted.exit_code == 0, fitted.stderr
    assert fitted.json()["registered_version"] == "2"
    assert registry.alias_version(client, name, registry.CHALLENGER) == "2"

    decision = cli("promote", "--model-name", name, "--tracking-uri", uri, "--json")
    assert decision.exit_code == 0, decision.stderr
    result = decision.json()
    accuracy = result["evidence"][0]["metrics"]["accuracy_score"]
    assert result["promoted"] is False
    assert result["reason"] == f"v2 accuracy {accuracy:.4f} is below the minimum 0.9900."
    assert registry.alias_version(client, name, registry.CHAMPION) == "1"
    assert client.get_model_version(name, "2").tags["promotion_refused"] == result["reason"]

    digits = tmp_path / "digits.npy"
    test = data.load(DataConfig(limit_train=100)).test
    np.save(digits, test.images[:50, 0].numpy())
    output = tmp_path / "out.csv"
    predicted = cli(
        "predict", str(digits), "--model-uri", f"models:/{name}/2", "--output", str(output),
        "--tracking-uri", uri,
    )  # fmt: skip
    assert predicted.exit_code == 0, predicted.stderr
    assert len(output.read_text().splitlines()) == 51

    # Served by our HTTP app like any version: the same labels as batch prediction.
    follower = ModelFollower(f"models:/{name}/2", tracking_uri=uri)
    follower.start()
    app = create_app(ServeConfig(tracking_uri=uri, model_uri=f"models:/{name}/2"), follower)
    pixels = test.images[:5, 0].numpy().tolist()
    response = TestClient(app).post("/predict", json={"pixels": pixels})
    assert response.status_code == 200, response.text
    served = [p["label"] for p in response.json()["predictions"]]
    with output.open() as f:
        batch = [int(row["label"]) for row in csv.DictReader(f)][:5]
    assert served == batch
