"""A finished run, read back through MlflowClient: everything the issue lists is there."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import FAST_ARGS, assert_abstention_logged, made, run_cli
from mnistflow.config import MnistflowError, TrainConfig
from mnistflow.data import DATASET_DIGEST
from mnistflow.engines.plain import native_bf16, resolve
from mnistflow.store.checks import check_reachable, empty_store_template, use_store
from mnistflow.store.experiments import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND, use_experiment

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
    client, summary = tracked
    run = client.get_run(summary["run_id"])
    assert summary["experiment_id"] == run.info.experiment_id
    assert summary["tracking_uri"] == client.tracking_uri
    assert summary["artifact_uri"] == run.info.artifact_uri
    assert summary["model_uri"].startswith("models:/m-")
    assert summary["preset"] == "fast" and summary["device"] == "cpu"
    assert summary["test_accuracy"] == pytest.approx(run.data.metrics["test_accuracy"])
    assert summary["test_macro_f1"] == pytest.approx(run.data.metrics["test_macro_f1"])
    # train_seconds: the epochs' loops, as logged per epoch; total_seconds: the whole command,
    # which also loads data, evaluates, exports and logs the models.
    epochs = client.get_metric_history(summary["run_id"], "epoch_seconds")
    assert summary["train_seconds"] == pytest.approx(sum(m.value for m in epochs))
    assert summary["total_seconds"] == pytest.approx(run.data.metrics["total_seconds"])
    assert summary["train_seconds"] < summary["total_seconds"]
    assert summary["registered_model"] is None and summary["registered_version"] is None


def test_run_has_name_description_status(tracked):
    client, summary = tracked
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "smoke"
    assert run.data.tags["mlflow.note.content"] == "A **small** run for the tests."
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "tests"
    # The MLflow UI opens it in its model-training view, not the GenAI one.
    assert experiment.tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    # Artifacts beside the database, never in whatever folder the command ran in.
    assert Path(run.info.artifact_uri).is_relative_to(
        Path(client.tracking_uri.removeprefix("sqlite:///")).parent / "mlruns"
    )


def test_params_hold_the_resolved_config(tracked):
    client, summary = tracked
    params = client.get_run(summary["run_id"]).data.params
    assert params["preset"] == "fast"
    assert params["train.epochs"] == "2"
    assert params["train.batch_size"] == "128"
    assert params["train.lr"] == "0.008"
    assert params["train.seed"] == "0"
    assert params["train.device"] == "cpu"  # resolved, never "auto"
    assert params["train.precision"] == ("bf16" if native_bf16(torch.device("cpu")) else "fp32")
    assert params["data.train_size"] == "2000"
    assert params["data.val_size"] == "5000"
    assert params["data.test_size"] == "10000"
    assert params["data.limit_train"] == "2000"
    # Every field that decides the weights is a param, the schedule's and augmentation's too.
    assert {f"train.{f.name}" for f in dataclasses.fields(TrainConfig)} - {"train.preset"} <= set(
        params
    )
    assert params["train.warmup"] == "0.25"
    assert params["train.augment_degrees"] == "10.0"
    assert params["train.augment_scale"] == "0.1"
    assert params["train.augment_shift"] == "2.5"


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
    seconds = client.get_metric_history(run_id, "epoch_seconds")
    speeds = client.get_metric_history(run_id, "images_per_second")
    for s, v in zip(seconds, speeds, strict=True):
        assert v.value == pytest.approx(2000 / s.value)
    assert metrics["test_accuracy"] == pytest.approx(summary["test_accuracy"])
    assert 0.8 < metrics["test_macro_f1"] <= 1
    assert all(0 <= metrics[f"test_accuracy_digit_{d}"] <= 1 for d in range(10))
    assert metrics["train_seconds"] == pytest.approx(summary["train_seconds"])
    assert_abstention_logged(client, run_id)


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
    # The whole config, with "auto" resolved to what ran (the run used --epochs 2).
    assert config["train"] == dataclasses.asdict(resolve(TrainConfig(epochs=2, device="cpu")))
    assert config["data"]["train_size"] == 2000
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
@pytest.mark.slow
def test_sync_and_async_logging_lose_nothing(mode: str, store: str, cli):
    result = cli("train", *FAST_ARGS, "--tracking-uri", store, mode, "--json")
    assert result.exit_code == 0, result.stderr
    client = MlflowClient(store)
    history = client.get_metric_history(result.json()["run_id"], "train_loss")
    assert [m.step for m in history] == list(range(2 * STEPS_PER_EPOCH))


def test_a_store_to_be_created_is_made_whole_from_the_template(store: str, monkeypatch):
    from mlflow.store.db import utils as db_utils

    assert empty_store_template() is not None  # made once per MLflow version
    monkeypatch.setattr(db_utils, "_upgrade_db", lambda *a: pytest.fail("migrated again"))
    with pytest.raises(MnistflowError, match="There is no MLflow store at"):
        use_store(store)  # only a command that writes runs makes one
    assert use_store(store, create=True) == store
    client = MlflowClient(store)
    assert [e.name for e in client.search_experiments()] == ["Default"]
    assert client.create_experiment("first") and use_store(store) == store


@pytest.mark.slow
def test_use_experiment_marks_old_experiments_and_keeps_a_chosen_kind(store: str):
    mlflow.set_tracking_uri(made(store))
    client = MlflowClient(store)
    untagged = client.create_experiment("made-by-mnistflow-0.1")
    guessed = client.create_experiment(
        "guessed", tags={EXPERIMENT_KIND_TAG: "genai_development_inferred"}
    )
    chosen = client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    assert use_experiment("made-by-mnistflow-0.1") == untagged
    assert use_experiment("guessed") == guessed
    assert use_experiment("chosen") == chosen
    new = use_experiment("new")
    assert mlflow.get_experiment_by_name("new").experiment_id == new  # and it is active
    assert mlflow.active_run() is None
    kinds = {
        e: client.get_experiment(e).tags[EXPERIMENT_KIND_TAG]
        for e in (untagged, guessed, chosen, new)
    }
    assert kinds == {
        untagged: MODEL_TRAINING_KIND,
        guessed: MODEL_TRAINING_KIND,
        chosen: "genai_development",
        new: MODEL_TRAINING_KIND,
    }


# -- is the tracking server an MLflow server? ------------------------------------------------


@contextlib.contextmanager
def fake_server(answers: dict[str, tuple[int, str]]) -> Iterator[tuple[str, list[dict]]]:
    """A loopback HTTP server answering GET path with (status, body); "*" for other paths.
    Yields its URL and the headers of every request it got."""
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append({"path": self.path, **dict(self.headers)})
            status, body = answers.get(self.path, answers.get("*", (404, "not found")))
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


MLFLOW_LIKE = {"/health": (200, "OK"), "/version": (200, "3.17.2")}


@pytest.mark.parametrize(
    ("answers", "words"),
    [
        ({"*": (502, "Bad Gateway")}, "is not a healthy MLflow tracking server (/health answered "
         "HTTP 502)"),
        ({"*": (200, "<html>a web page</html>")}, "is not a healthy MLflow tracking server"),
        ({"*": (200, "OK")}, "answers, but not as an MLflow tracking server (/version answered "
         "HTTP 200)"),
        ({"/health": (200, "OK")}, "not as an MLflow tracking server (/version answered HTTP 404)"),
        ({"/health": (200, "OK"), "/version": (401, "")}, "needs a login (HTTP 401): set "
         "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"),
    ],
)  # fmt: skip
def test_only_an_mlflow_server_passes_the_check(answers, words: str, monkeypatch):
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    with fake_server(answers) as (url, _), pytest.raises(MnistflowError) as refused:
        check_reachable(url)
    message = " ".join(str(refused.value).split())
    assert words in message and message.startswith((url, "The MLflow server"))


def test_an_mlflow_server_passes_and_gets_the_users_login(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "secret")
    with fake_server(MLFLOW_LIKE) as (url, seen):
        check_reachable(url)
        check_reachable(url + "/")
    login = "Basic " + base64.b64encode(b"alice:secret").decode()
    assert [r["path"] for r in seen] == ["/health", "/version"] * 2
    assert all(r["Authorization"] == login for r in seen)
    with (
        fake_server({"/health": (200, "OK"), "/version": (401, "")}) as (url, _),
        pytest.raises(MnistflowError, match="refused the login of 'alice' \\(HTTP 401\\)"),
    ):
        check_reachable(url)


def test_train_against_a_proxy_that_answers_502_starts_nothing(store: str, tmp_path: Path):
    # Without --require-server the run would go to the local spool (see test_spool.py).
    with fake_server({"*": (502, "Bad Gateway")}) as (url, seen):
        result = run_cli("train", *FAST_ARGS, "--tracking-uri", url, "--require-server")
    assert result.exit_code == 1
    assert "is not a healthy MLflow tracking server" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
    assert [r["path"] for r in seen] == ["/health"]  # nothing logged, no run started
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # and no store made here
