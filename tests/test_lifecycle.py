"""The model's life in MLflow: logged, registered, promoted by evidence, rolled back, and
loaded or served by MLflow's own tools.

Every test that registers or promotes works on a registered model of its own (a fresh
name), so the tests pass in any order on the session's shared store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
from mlflow.tracking import MlflowClient

from conftest import MNISTFLOW, run_cli, tool_env
from mnistflow import data
from mnistflow.lifecycle import promotion, registry
from mnistflow.stack.servers import free_port, wait_until_up


@pytest.fixture
def client(registered) -> MlflowClient:
    """A client on the registered store, which is also where the CLI calls below go."""
    uri, _ = registered
    mlflow.set_tracking_uri(uri)
    return registry.client_for(uri)


def fresh_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def served_model_id(client: MlflowClient, run_id: str) -> str:
    experiment_id = client.get_run(run_id).info.experiment_id
    (model,) = client.search_logged_models(
        experiment_ids=[experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = 'model'",
    )
    return str(model.model_id)


def test_every_run_logs_a_pyfunc_and_a_torch_model(registered, client, test_split, tmp_path):
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
    outputs = [c["name"] for c in info.signature.outputs.to_dict()]
    assert outputs == ["label", "probabilities", "confidence", "abstain"]
    # The input example is the first two test digits, in the documented request shape.
    local = mlflow.artifacts.download_artifacts(
        f"models:/{by_name['model'].model_id}", dst_path=str(tmp_path / "model")
    )
    example = mlflow.models.Model.load(local).load_input_example(local)
    assert example.dtype == np.float32
    assert np.array_equal(example, test_split.images[:2, 0].numpy().astype(np.float32))
    torch_info = mlflow.models.get_model_info(f"models:/{by_name['pytorch'].model_id}")
    assert torch_info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 1, 28, 28)
    # The test metrics are linked to the logged model, so MLflow's model views show them.
    linked = {m.key: m.value for m in client.get_logged_model(by_name["model"].model_id).metrics}
    assert linked["test_accuracy"] == pytest.approx(runs["good"]["test_accuracy"])
    requirements = (Path(local) / "requirements.txt").read_text()
    assert "onnxruntime==" in requirements and "torch" not in requirements


def test_registered_version_is_described_tagged_linked_and_challenger(registered, client):
    _, runs = registered
    run_id = runs["good"]["run_id"]
    name = fresh_name("described")
    result = run_cli("register", run_id, "--model-name", name, "--json")
    assert result.exit_code == 0, result.stderr
    assert result.json()["version"] == "1"
    version = client.get_model_version(name, "1")
    run = client.get_run(run_id)
    assert version.tags == {
        "test_accuracy": f"{runs['good']['test_accuracy']:.4f}",
        "run_id": run_id,
        "git_commit": run.data.tags["git_commit"],
        "preset": "fast",
        "dataset_digest": data.DATASET_DIGEST,
    }
    assert version.description == (
        f"fast preset, test accuracy {runs['good']['test_accuracy']:.2%}, trained on cpu in "
        f"{run.data.metrics['train_seconds']:.1f} s (run {run_id})."
    )
    model_id = served_model_id(client, run_id)
    logged = client.get_logged_model(model_id)
    assert (version.source, version.run_id) == (logged.artifact_location, run_id)
    links = json.loads(client.get_logged_model(model_id).tags["mlflow.modelVersions"])
    assert {"name": name, "version": "1"} in links
    assert registry.alias_version(client, name, "challenger") == "1"


def test_promotion_sets_first_champion_then_refuses_worse_and_too_weak(registered, client):
    _, runs = registered
    model_name = fresh_name("digits")
    name = ["--model-name", model_name]
    assert run_cli("register", runs["good"]["run_id"], *name).exit_code == 0
    # Too weak on other writers' digits (the second floor): refused after its test score.
    weak = run_cli("promote", *name, "--min-accuracy", "0.8", "--min-writers-accuracy", "0.9999")
    assert weak.exit_code == 0, weak.stderr
    assert "not promoted: v1 accuracy on other writers' digits" in " ".join(weak.stdout.split())
    assert registry.alias_version(client, model_name, "champion") is None

    first = run_cli(
        "promote", *name, "--min-accuracy", "0.8", "--min-writers-accuracy", "0.5", "--json"
    )
    assert first.exit_code == 0, first.stderr
    decision = first.json()
    assert decision["promoted"] is True and decision["champion_version"] == "1"
    assert decision["previous_champion_version"] is None
    assert "on other writers' digits" in decision["reason"]
    assert [e["role"] for e in decision["evidence"]] == ["challenger", "challenger, other writers"]
    assert registry.alias_version(client, model_name, "challenger") is None
    eval_run = client.get_run(decision["evaluation_run_id"])
    assert eval_run.data.tags["promoted"] == "true"
    assert eval_run.data.params["test_size"] == "10000"
    assert eval_run.data.params["writers_size"] == "4000"
    children = client.search_runs(
        [eval_run.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{eval_run.info.run_id}'",
    )
    by_role = {child.data.tags["role"]: child for child in children}
    for i, role in enumerate(("challenger", "challenger, other writers")):
        assert by_role[role].data.metrics["accuracy_score"] == pytest.approx(
            decision["evidence"][i]["metrics"]["accuracy_score"]
        )
    # The trained model itself scores the same on the same digits as it did in training.
    trained = client.get_run(runs["good"]["run_id"]).data.metrics
    assert decision["evidence"][0]["metrics"]["accuracy_score"] == pytest.approx(
        runs["good"]["test_accuracy"], abs=1e-4
    )
    assert decision["evidence"][1]["metrics"]["accuracy_score"] == pytest.approx(
        trained["writers_accuracy"], abs=1e-4
    )

    # The poor run is far worse than the champion: refused, @champion stays at 1.
    poor = run_cli("register", runs["poor"]["run_id"], *name, "--json")
    assert poor.exit_code == 0, poor.stderr
    poor_version = poor.json()["version"]
    refused = run_cli(
        "promote", *name, "--min-accuracy", "0.1", "--min-writers-accuracy", "0",
        "--margin", "0.01", "--json",
    )  # fmt: skip
    assert refused.json()["promoted"] is False
    assert "worse than champion v1" in refused.json()["reason"]
    roles = [e["role"] for e in refused.json()["evidence"]]
    assert roles == ["challenger", "challenger, other writers", "champion"]
    assert registry.alias_version(client, model_name, "champion") == "1"
    assert registry.alias_version(client, model_name, "challenger") == poor_version
    assert (
        client.get_model_version(model_name, poor_version).tags["promotion_refused"]
        == refused.json()["reason"]
    )

    # Below the absolute floor: refused before the champion is even consulted (one row).
    text = run_cli("promote", *name, "--min-accuracy", "0.9999")
    assert text.exit_code == 0, text.stderr
    assert f"not promoted: v{poor_version} accuracy" in text.stdout
    assert "is below the minimum 0.9999" in text.stdout and "@champion is version 1" in text.stdout
    assert "champion" not in text.stdout.split("not promoted")[0]  # no champion row
    assert registry.alias_version(client, model_name, "champion") == "1"

    # Forced through with a generous margin, then rolled back.
    forced = run_cli(
        "promote", *name, "--min-accuracy", "0.1", "--min-writers-accuracy", "0",
        "--margin", "1", "--json",
    )  # fmt: skip
    assert forced.json()["promoted"] is True
    assert registry.champion_history(client, model_name) == ["1", poor_version]
    back = run_cli("rollback", *name, "--json")
    assert back.exit_code == 0, back.stderr
    assert back.json() == {
        "model_name": model_name,
        "rolled_back_from": poor_version,
        "champion_version": "1",
    }
    assert registry.alias_version(client, model_name, "champion") == "1"
    again = run_cli("rollback", *name)
    assert again.exit_code == 1 and "no earlier champion" in again.stderr


def test_promoting_a_named_version_keeps_another_challenger_and_repeating_changes_nothing(
    registered, test_split: data.Split, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    uri, runs = registered
    monkeypatch.chdir(tmp_path)  # where MLflow's default store would appear, if it were used
    client = registry.client_for(uri)
    name = fresh_name("named")
    for _ in range(2):
        registry.register(client, runs["good"]["run_id"], name)
    # The first thousand test digits are enough to decide between two copies of one model.
    small = data.Split("test", test_split.images[:1000], test_split.labels[:1000], "first-1000")
    assert registry.alias_version(client, name, "challenger") == "2"

    first = promotion.promote(uri, name, version="1", min_accuracy=0.5, test=small)
    assert first.promoted and registry.alias_version(client, name, "champion") == "1"
    # @challenger names version 2, which nobody evaluated yet: it must stay.
    assert registry.alias_version(client, name, "challenger") == "2"

    second = promotion.promote(uri, name, min_accuracy=0.5, test=small)
    assert (second.challenger_version, second.promoted) == ("2", True)
    assert registry.alias_version(client, name, "challenger") is None

    # Version 2 is @champion already: nothing changes, and rollback still steps back to 1.
    repeat = promotion.promote(uri, name, version="2", min_accuracy=0.5, test=small)
    assert repeat.promoted is False and "already @champion" in repeat.reason
    assert repeat.champion_version == "2"
    assert registry.champion_history(client, name) == ["1", "2"]
    assert registry.rollback(client, name) == ("2", "1")

    # Promotion touched only the store it was given, and says what kind of experiment it is.
    assert not mlflow.is_tracking_uri_set() and not (tmp_path / "mlflow.db").exists()
    experiment = client.get_experiment_by_name(promotion.EXPERIMENT)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    parent = client.get_run(repeat.evaluation_run_id)
    assert parent.info.status == "FINISHED" and parent.data.params["test_size"] == "1000"


def test_promote_and_rollback_name_what_exists_when_asked_for_nothing(client):
    missing = run_cli("promote", "--model-name", "nope")
    assert missing.exit_code == 1 and "No registered model 'nope'" in missing.stderr
    assert "mnist (versions" in missing.stderr
    rollback = run_cli("rollback", "--model-name", "nope")
    assert rollback.exit_code == 1 and "No registered model 'nope'" in rollback.stderr


def test_concurrent_registrations_all_land(registered, client, spawn):
    uri, runs = registered
    name = fresh_name("concurrent")
    args = ["register", runs["good"]["run_id"], "--model-name", name, "--tracking-uri", uri]
    procs = [spawn([*MNISTFLOW, *args, "--json"]) for _ in range(4)]
    versions = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        versions.append(json.loads(stdout.strip().splitlines()[-1])["version"])
    assert sorted(versions) == ["1", "2", "3", "4"]
    landed = {str(v.version) for v in client.search_model_versions(f"name='{name}'")}
    assert landed == {"1", "2", "3", "4"}
    assert registry.alias_version(client, name, "challenger") in landed


def champion_predictions(pixels: np.ndarray) -> tuple[list[int], np.ndarray]:
    """Labels and probabilities of mnist@champion loaded in this process."""
    out = mlflow.pyfunc.load_model("models:/mnist@champion").predict(pixels)
    return list(out["label"]), np.stack(out["probabilities"])


def test_a_fresh_process_loads_the_champion_with_mlflow_alone(registered, client, test_split):
    uri, _ = registered
    pixels = test_split.images[:3, 0].numpy().astype(np.float32)
    code = (
        "import mlflow, numpy as np, json, sys;"
        "m = mlflow.pyfunc.load_model('models:/mnist@champion');"
        "out = m.predict(np.array(json.load(sys.stdin), np.float32));"
        "print(json.dumps({'labels': [int(x) for x in out['label']],"
        " 'probabilities': [list(map(float, p)) for p in out['probabilities']]}))"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    result = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(pixels.tolist()),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    labels, probabilities = champion_predictions(pixels)
    assert out["labels"] == labels
    assert np.allclose(out["probabilities"], probabilities, atol=1e-6)
    assert np.allclose(np.sum(out["probabilities"], axis=1), 1.0, atol=1e-5)


def test_mlflow_models_serve_answers_the_documented_request(registered, client, spawn, test_split):
    uri, _ = registered
    port = free_port()
    proc = spawn(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/mnist@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        env=tool_env(MLFLOW_TRACKING_URI=uri),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_until_up(f"http://127.0.0.1:{port}/ping", proc, timeout=120)
    pixels = test_split.images[:20, 0].numpy().astype(np.float32)
    response = requests.post(
        f"http://127.0.0.1:{port}/invocations", json={"inputs": pixels.tolist()}, timeout=30
    )
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    labels, probabilities = champion_predictions(pixels)
    assert [p["label"] for p in predictions] == labels
    assert np.allclose([p["probabilities"] for p in predictions], probabilities, atol=1e-6)


def test_mlflow_models_predict_classifies_a_file(registered, client, test_split, tmp_path):
    uri, _ = registered
    pixels = test_split.images[:10, 0].numpy().astype(np.float32)
    request = tmp_path / "input.json"
    request.write_text(json.dumps({"inputs": pixels.tolist()}))
    result = subprocess.run(
        [sys.executable, "-m", "mlflow", "models", "predict", "-m", "models:/mnist@champion",
         "-i", str(request), "-t", "json", "--env-manager", "local"],
        env=tool_env(MLFLOW_TRACKING_URI=uri), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    predictions = json.loads(result.stdout.strip().splitlines()[-1])["predictions"]
    assert [p["label"] for p in predictions] == champion_predictions(pixels)[0]
