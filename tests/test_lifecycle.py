"""The model's life in MLflow: logged, registered, promoted by evidence, rolled back, and
loaded or served by MLflow's own tools."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
from mlflow.tracking import MlflowClient

from conftest import MIRROR, MNISTFLOW, free_port, run_cli, tool_env
from mnistflow import data, registry
from mnistflow.config import DataConfig


@pytest.fixture
def client(registered) -> MlflowClient:
    """A client on the registered store, which is also where the CLI calls below go."""
    uri, _ = registered
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


def test_every_run_logs_a_pyfunc_and_a_torch_model(registered, client: MlflowClient):
    _, runs = registered
    run_id = runs["good"]["run_id"]
    experiment_id = client.get_run(run_id).info.experiment_id
    models = client.search_logged_models(
        experiment_ids=[experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    by_name = {m.name: m for m in models}
    assert set(by_name) == {"model", "pytorch"}
    info = mlflow.models.get_model_info(f"models:/{by_name['model'].model_id}")
    assert info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 28, 28)
    assert [c["name"] for c in info.signature.outputs.to_dict()] == ["label", "probabilities"]
    assert info.saved_input_example_info is not None
    torch_info = mlflow.models.get_model_info(f"models:/{by_name['pytorch'].model_id}")
    assert torch_info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 1, 28, 28)
    # The test metrics are linked to the logged model, so MLflow's model views show them.
    linked = {m.key for m in client.get_logged_model(by_name["model"].model_id).metrics}
    assert "test_accuracy" in linked
    location = by_name["model"].artifact_location
    requirements = Path(
        mlflow.artifacts.download_artifacts(artifact_uri=f"{location}/requirements.txt")
    ).read_text()
    assert "onnxruntime==" in requirements and "torch" not in requirements


def test_registered_version_is_described_tagged_and_challenger(registered, client):
    _, runs = registered
    version = client.get_model_version("mnist", runs["good"]["registered_version"])
    assert version.tags["run_id"] == runs["good"]["run_id"]
    assert float(version.tags["test_accuracy"]) == pytest.approx(
        runs["good"]["test_accuracy"], abs=1e-4
    )
    assert version.tags["preset"] == "fast" and version.tags["git_commit"]
    assert "test accuracy" in version.description
    assert registry.alias_version(client, "mnist", "challenger") == str(version.version)


def test_promotion_sets_first_champion_then_refuses_worse_and_too_weak(registered, client):
    _, runs = registered
    name = ["--model-name", "digits"]
    assert run_cli("register", runs["good"]["run_id"], *name).exit_code == 0
    first = run_cli("promote", *name, "--min-accuracy", "0.8", "--json")
    assert first.exit_code == 0, first.stderr
    decision = first.json()
    assert decision["promoted"] is True and decision["champion_version"] == "1"
    assert decision["previous_champion_version"] is None
    assert registry.alias_version(client, "digits", "challenger") is None
    eval_run = client.get_run(decision["evaluation_run_id"])
    assert eval_run.data.tags["promoted"] == "true"
    children = client.search_runs(
        [eval_run.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{eval_run.info.run_id}'",
    )
    assert children and "accuracy_score" in children[0].data.metrics

    # The poor run is far worse than the champion: refused, @champion stays at 1.
    poor = run_cli("register", runs["poor"]["run_id"], *name, "--json")
    assert poor.exit_code == 0, poor.stderr
    poor_version = poor.json()["version"]
    refused = run_cli("promote", *name, "--min-accuracy", "0.1", "--margin", "0.01", "--json")
    assert refused.json()["promoted"] is False
    assert "worse than champion v1" in refused.json()["reason"]
    assert [e["role"] for e in refused.json()["evidence"]] == ["challenger", "champion"]
    assert registry.alias_version(client, "digits", "champion") == "1"
    assert registry.alias_version(client, "digits", "challenger") == poor_version

    # Below the absolute floor: refused before the champion is even consulted.
    floor = run_cli("promote", *name, "--min-accuracy", "0.9999", "--json").json()
    assert floor["promoted"] is False and "below the minimum" in floor["reason"]
    assert registry.alias_version(client, "digits", "champion") == "1"
    text = run_cli("promote", *name, "--min-accuracy", "0.9999")
    assert "not promoted" in text.stdout and "@champion is version 1" in text.stdout

    # Forced through with a generous margin, then rolled back.
    forced = run_cli("promote", *name, "--min-accuracy", "0.1", "--margin", "1", "--json")
    assert forced.json()["promoted"] is True
    assert registry.champion_history(client, "digits") == ["1", poor_version]
    back = run_cli("rollback", *name, "--json")
    assert back.exit_code == 0, back.stderr
    assert back.json() == {
        "model_name": "digits",
        "rolled_back_from": poor_version,
        "champion_version": "1",
    }
    assert registry.alias_version(client, "digits", "champion") == "1"
    again = run_cli("rollback", *name)
    assert again.exit_code == 1 and "no earlier champion" in again.stderr


def test_promote_and_rollback_name_what_exists_when_asked_for_nothing(client):
    missing = run_cli("promote", "--model-name", "nope")
    assert missing.exit_code == 1 and "No registered model 'nope'" in missing.stderr
    assert "mnist (versions" in missing.stderr
    assert run_cli("rollback", "--model-name", "nope").exit_code == 1


def test_concurrent_registrations_all_land(registered, client, spawn):
    uri, runs = registered
    before = {str(v.version) for v in client.search_model_versions("name='mnist'")}
    procs = [
        spawn([*MNISTFLOW, "register", runs["good"]["run_id"], "--tracking-uri", uri, "--json"])
        for _ in range(4)
    ]
    versions = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        versions.append(json.loads(stdout.strip().splitlines()[-1])["version"])
    assert len(set(versions)) == 4
    after = {str(v.version) for v in client.search_model_versions("name='mnist'")}
    assert after - before == set(versions)


def test_a_fresh_process_loads_the_champion_with_mlflow_alone(registered):
    uri, _ = registered
    code = (
        "import mlflow, numpy as np, json;"
        "m = mlflow.pyfunc.load_model('models:/mnist@champion');"
        "out = m.predict(np.zeros((3, 28, 28), np.float32));"
        "print(json.dumps({'n': len(out), 'cols': list(out.columns),"
        " 'sum': float(np.sum(out['probabilities'].iloc[0]))}))"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["n"] == 3 and out["cols"] == ["label", "probabilities"]
    assert out["sum"] == pytest.approx(1.0, abs=1e-5)


def _test_digits(n: int) -> tuple[np.ndarray, np.ndarray]:
    test = data.load(DataConfig(mirror=str(MIRROR))).test
    return test.images[:n, 0].numpy().astype(np.float32), test.labels[:n].numpy()


def test_mlflow_models_serve_answers_the_documented_request(registered, spawn, tmp_path):
    uri, _ = registered
    port = free_port()
    proc = spawn(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/mnist@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        env=tool_env(MLFLOW_TRACKING_URI=uri),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert proc.poll() is None, "mlflow models serve exited"
        try:
            if requests.get(f"http://127.0.0.1:{port}/ping", timeout=1).ok:
                break
        except requests.ConnectionError:
            time.sleep(0.5)
    else:
        pytest.fail("mlflow models serve did not start")
    pixels, labels = _test_digits(20)
    response = requests.post(
        f"http://127.0.0.1:{port}/invocations", json={"inputs": pixels.tolist()}, timeout=30
    )
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == 20
    assert all(len(p["probabilities"]) == 10 for p in predictions)
    assert np.mean([p["label"] for p in predictions] == labels) >= 0.8


def test_mlflow_models_predict_classifies_a_file(registered, client, tmp_path):
    uri, _ = registered
    pixels, _ = _test_digits(10)
    request = tmp_path / "input.json"
    request.write_text(json.dumps({"inputs": pixels.tolist()}))
    result = subprocess.run(
        [sys.executable, "-m", "mlflow", "models", "predict", "-m", "models:/mnist@champion",
         "-i", str(request), "-t", "json", "--env-manager", "local"],
        env=tool_env(MLFLOW_TRACKING_URI=uri), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    predictions = json.loads(result.stdout.strip().splitlines()[-1])["predictions"]
    assert [p["label"] for p in predictions] == pytest.approx(list(_champion_labels(pixels)), abs=0)


def _champion_labels(pixels: np.ndarray) -> np.ndarray:
    model = mlflow.pyfunc.load_model("models:/mnist@champion")
    return np.asarray(model.predict(pixels)["label"])
