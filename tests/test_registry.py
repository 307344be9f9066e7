"""The registry on stores of its own: a no-op promotion changes nothing, rollback always
moves, concurrent promotions lose nothing, every call stays in the client's store; and the
one path that logs any trainer's ONNX graph as the served model."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import mnistflow
from conftest import made, run_cli
from mnistflow.config import MnistflowError
from mnistflow.lifecycle import logged_models, registry

SRC = Path(mnistflow.__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def registry_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One store for this module's registry tests (creating a sqlite store takes seconds);
    each test works on a registered model of its own."""
    return made(f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}")


@pytest.fixture
def versions(registry_store: str, tmp_path: Path) -> tuple[str, MlflowClient, str]:
    """A registered model of four versions under a fresh name (no artifacts needed: the
    champion history only moves aliases and tags)."""
    client = MlflowClient(registry_store, registry_uri=registry_store)
    name = f"race-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    for _ in range(4):
        client.create_model_version(name, source=str(tmp_path / "model"))
    return registry_store, client, name


@pytest.mark.slow
def test_promoting_the_champion_again_changes_nothing_and_rollback_always_moves(versions):
    _, client, name = versions
    registry.make_champion(client, name, "1", "first")
    registry.make_champion(client, name, "2", "better")
    registry.make_champion(client, name, "2", "the same again")
    assert registry.champion_history(client, name) == ["1", "2"]
    assert registry.alias_version(client, name, "champion") == "2"
    assert client.get_model_version(name, "2").tags["promotion_reason"] == "better"

    registry.make_champion(client, name, "1", "back to the first")
    assert registry.champion_history(client, name) == ["1", "2", "1"]
    steps = []
    while len(registry.champion_history(client, name)) > 1:
        steps.append(registry.rollback(client, name))
        assert registry.alias_version(client, name, "champion") == steps[-1][1]
    assert steps == [("1", "2"), ("2", "1")]
    with pytest.raises(MnistflowError, match="no earlier champion to roll back to"):
        registry.rollback(client, name)
    # A rollback undone by promoting again continues the history from where it stands.
    registry.make_champion(client, name, "3", "newer")
    assert registry.champion_history(client, name) == ["1", "3"]
    assert registry.rollback(client, name) == ("3", "1")


# Each child promotes its own two versions in turn as fast as it can, from the moment the
# parent says go; the store sees the two streams interleaved.
PROMOTER = """
import sys, time, pathlib
from mlflow.tracking import MlflowClient
from mnistflow.lifecycle import registry
uri, name, go, mine, rounds = sys.argv[1:]
client = MlflowClient(uri, registry_uri=uri)
registry.champion_history(client, name)  # connect and warm up before the start
print("ready", flush=True)
while not pathlib.Path(go).exists():
    time.sleep(0.005)
for i in range(int(rounds)):
    registry.make_champion(client, name, mine.split(",")[i % 2], f"round {i}")
"""


@pytest.mark.slow
def test_concurrent_promotions_lose_none_and_the_alias_ends_on_the_last(
    versions, spawn, tmp_path: Path
):
    uri, client, name = versions
    rounds = 12
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    children = [
        spawn([sys.executable, "-c", PROMOTER, uri, name, str(go), mine, str(rounds)], env=env)
        for mine in ("1,2", "3,4")
    ]
    for child in children:
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
    go.touch()
    for child in children:
        _, stderr = child.communicate(timeout=120)
        assert child.returncode == 0, stderr

    history = registry.champion_history(client, name)
    # Every promotion is there, each child's in the order it made them.
    assert len(history) == 2 * rounds
    assert [v for v in history if v in ("1", "2")] == ["1", "2"] * (rounds // 2)
    assert [v for v in history if v in ("3", "4")] == ["3", "4"] * (rounds // 2)
    assert registry.alias_version(client, name, "champion") == history[-1]


def test_every_registry_call_stays_in_the_clients_store(
    registered, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    uri, runs = registered
    # MLflow's process-wide registry points elsewhere; mnistflow must not follow it.
    elsewhere = tmp_path / "elsewhere.db"
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"sqlite:///{elsewhere}")
    name = f"stays-{uuid.uuid4().hex[:8]}"
    for _ in range(2):
        result = run_cli(
            "register", runs["good"]["run_id"], "--model-name", name, "--tracking-uri", uri
        )
        assert result.exit_code == 0, result.stderr
    client = MlflowClient(uri, registry_uri=uri)
    assert sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'")) == [1, 2]
    assert registry.alias_version(client, name, "challenger") == "2"
    assert not elsewhere.exists()


def test_register_refuses_a_run_without_a_served_model(versions):
    _, client, _ = versions
    with pytest.raises(MnistflowError, match="No run with id nope in sqlite:///"):
        registry.register(client, "nope", "never")
    experiment = client.create_experiment(f"bare-{uuid.uuid4().hex[:8]}")
    bare = client.create_run(experiment).info.run_id
    with pytest.raises(MnistflowError, match="has no logged model named 'model'"):
        registry.register(client, bare, "never")
    assert registry.describe_models(client).count("never") == 0


# -- logging any trainer's ONNX graph as the served model -----------------------------------


def linear_onnx(path: Path, weights: np.ndarray, input_name: str = "pixels") -> Path:
    """A tiny stand-in for a trainer's export: softmax(flatten(pixels) @ weights)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("Flatten", [input_name], ["flat"]),
            helper.make_node("MatMul", ["flat", "weights"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "linear",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(weights.astype(np.float32), "weights")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what the installed ONNX Runtime reads
    onnx.save(model, path)
    return path


def linear_probabilities(pixels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    logits = pixels.reshape(len(pixels), 784).astype(np.float64) @ weights
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


@pytest.mark.slow
def test_log_served_model_checks_the_graph_then_serves_it(tmp_path: Path, store: str):
    rng = np.random.default_rng(0)
    weights = rng.normal(0, 0.01, (784, 10))
    pixels = rng.integers(0, 256, (8, 1, 28, 28)).astype(np.uint8)
    expected = linear_probabilities(pixels, weights)
    onnx_path = linear_onnx(tmp_path / "linear.onnx", weights)
    mlflow.set_tracking_uri(made(store))
    mlflow.set_experiment("any-trainer")
    with mlflow.start_run() as run:
        # Refused: the labels differ from the trainer's, a wrong interface, a wrong shape.
        with pytest.raises(MnistflowError, match="disagrees with the trained model"):
            logged_models.log_served_model(
                onnx_path, pixels, np.roll(expected, 1, axis=1), abstain_below=0.5
            )
        renamed = linear_onnx(tmp_path / "renamed.onnx", weights, input_name="x")
        with pytest.raises(MnistflowError, match="one input 'pixels'"):
            logged_models.log_served_model(
                renamed, pixels, linear_probabilities(pixels, weights), abstain_below=0.5
            )
        with pytest.raises(MnistflowError, match=r"shaped \(N, 1, 28, 28\)"):
            logged_models.log_served_model(onnx_path, pixels[:, 0], expected, abstain_below=0.5)
        with pytest.raises(MnistflowError, match=r"abstain_below must be a probability"):
            logged_models.log_served_model(onnx_path, pixels, expected, abstain_below=1.5)
        assert mlflow.search_logged_models(output_format="list") == []

        # A threshold between the digits' confidences: some abstain, some do not.
        below = float(np.median(expected.max(1)))
        uri, model_id, diff = logged_models.log_served_model(
            onnx_path, pixels, expected, abstain_below=below
        )
    assert uri == f"models:/{model_id}" and diff < 1e-5
    logged = MlflowClient(store).get_logged_model(model_id)
    assert (logged.name, logged.source_run_id) == ("model", run.info.run_id)
    served = mlflow.pyfunc.load_model(uri).predict(pixels[:, 0].astype(np.float32))
    assert list(served["label"]) == list(expected.argmax(1))
    assert np.allclose(np.stack(served["probabilities"]), expected, atol=1e-5)
    # The threshold travels with the model: each row says how sure it is, and whether it
    # is under the threshold.
    assert np.allclose(served["confidence"], expected.max(1), atol=1e-5)
    assert list(served["abstain"]) == list(np.stack(served["probabilities"]).max(1) < below)
    assert 0 < served["abstain"].sum() < len(served)
