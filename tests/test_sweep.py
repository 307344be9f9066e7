"""Hyperparameter sweeps: one parent run per study, a child run per trial, pruning, selection
on validation only, registration, several workers and commands on one study."""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import MNISTFLOW, assert_abstention_logged, made, run_cli
from mnistflow.config import preset_config
from mnistflow.lifecycle import networks as models
from mnistflow.lifecycle import registry
from mnistflow.stack import servers
from mnistflow.sweep.definition import SweepDefinition
from mnistflow.sweep.storage import DEFAULT_STORAGE, open_storage

SLICE = ["--limit-train", "1000", "--epochs", "2"]
# Only the learning rate is searched: the enqueued trials below then fix every trial's recipe.
SPACE = "lr: {low: 1e-5, high: 0.03, log: true}\n"
LRS = (0.01, 0.005, 0.01, 1e-5)


def journal(path: Path) -> optuna.storages.BaseStorage:
    return open_storage(str(path))


def children(client: MlflowClient, parent: dict[str, Any]) -> list[Any]:
    return client.search_runs(
        [parent["experiment_id"]],
        filter_string=f"tags.mlflow.parentRunId = '{parent['parent_run_id']}'",
    )


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A finished 4-trial sweep, registered: three good learning rates (the first one twice),
    then a hopeless one that the median pruner stops. Enqueued, so the outcome does not hang
    on the sampler."""
    folder = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    storage = folder / "study.log"
    (folder / "space.yaml").write_text(SPACE)
    study = optuna.create_study(storage=journal(storage), study_name="s1", direction="maximize")
    for lr in LRS:
        study.enqueue_trial({"lr": lr})
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        result = run_cli(
            "sweep", "--study", "s1", "--storage", str(storage), "--trials", "4",
            "--space", str(folder / "space.yaml"), *SLICE, "--tracking-uri", uri,
            "--register", "--model-name", "swept", "--json",
        )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
    yield {**result.json(), "uri": uri, "storage": storage, "folder": folder}


def test_one_parent_run_with_a_child_run_per_trial(swept):
    client = MlflowClient(swept["uri"])
    parent = client.get_run(swept["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["space.lr"] == "log-uniform [1e-05, 0.03]"
    assert parent.data.params["pruner"].startswith("MedianPruner")
    assert parent.data.params["budget.trials"] == "4"
    assert "TPESampler" in parent.data.params["sampler"]
    runs = children(client, swept)
    assert len(runs) == 4
    by_number = {int(r.data.tags["trial_number"]): r for r in runs}
    assert sorted(by_number) == [0, 1, 2, 3]
    for number, run in by_number.items():
        # The full record of a training run: params, per-epoch metrics, tags, dataset inputs.
        assert float(run.data.params["train.lr"]) == pytest.approx(LRS[number])
        assert run.data.params["data.limit_train"] == "1000"
        assert run.data.tags["sweep_study"] == "s1" and run.data.tags["git_commit"]
        assert "val_accuracy" in run.data.metrics and "train_loss" in run.data.metrics
        assert {d.dataset.name for d in run.inputs.dataset_inputs} >= {"mnist-train", "mnist-test"}
    # The parent's best-so-far curve, stepped by trial number.
    history = sorted(
        client.get_metric_history(parent.info.run_id, "best_val_accuracy"), key=lambda m: m.step
    )
    values = [m.value for m in history]
    assert [m.step for m in history] == [0, 1, 2, 3] and values == sorted(values)
    assert max(values) == pytest.approx(swept["best_val_accuracy"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {
        "sweep/trials.csv",
        "sweep/optimization_history.png",
        "sweep/parallel_coordinate.png",
        "sweep/param_importances.png",
    } <= artifacts


def test_the_same_params_give_the_same_trial(swept):
    # Each trial's network is seeded on its own: its result does not depend on earlier trials.
    study = optuna.load_study(study_name="s1", storage=journal(swept["storage"]))
    assert study.trials[0].params == study.trials[2].params
    assert study.trials[0].value == study.trials[2].value


def test_hopeless_trial_is_pruned_early_and_says_so(swept):
    client = MlflowClient(swept["uri"])
    run = next(r for r in children(client, swept) if r.data.tags["trial_number"] == "3")
    assert run.data.tags["trial_state"] == "pruned"
    assert "pruned after epoch 1" in run.data.tags["mlflow.note.content"]
    # Ended after its first epoch of two, and without weights (nothing to select it for).
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [1]
    assert not client.list_artifacts(run.info.run_id, "weights")
    trial = optuna.load_study(study_name="s1", storage=journal(swept["storage"])).trials[3]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert swept["trials_pruned"] == 1 and swept["trials_complete"] == 3


def test_best_trial_is_chosen_on_validation_and_alone_sees_the_test_set(swept):
    client = MlflowClient(swept["uri"])
    runs = children(client, swept)
    complete = [r for r in runs if r.data.tags["trial_state"] == "complete"]
    # The highest validation accuracy; on a tie, the earliest trial (as Optuna's best_trial).
    best = max(
        complete,
        key=lambda r: (r.data.metrics["val_accuracy"], -int(r.data.tags["trial_number"])),
    )
    assert best.info.run_id == swept["best_run_id"]
    assert int(best.data.tags["trial_number"]) == swept["best_trial"]
    assert best.data.metrics["val_accuracy"] == pytest.approx(swept["best_val_accuracy"])
    with_test = [r.info.run_id for r in runs if "test_accuracy" in r.data.metrics]
    assert with_test == [swept["best_run_id"]]
    assert best.data.metrics["test_accuracy"] == pytest.approx(swept["best_test_accuracy"])
    # Only the best trial logs the served model.
    logged = client.search_logged_models(experiment_ids=[swept["experiment_id"]])
    assert {m.source_run_id for m in logged} == {swept["best_run_id"]}
    assert client.get_run(swept["parent_run_id"]).data.tags["best_run_id"] == best.info.run_id


def test_register_makes_the_best_model_the_challenger(swept):
    client = MlflowClient(swept["uri"])
    assert swept["registered_version"] == "1"
    assert registry.alias_version(client, "swept", "challenger") == "1"
    version = client.get_model_version("swept", "1")
    assert version.tags["run_id"] == swept["best_run_id"]
    # The served contract: raw pixels in, labels out, as every trained model.
    mlflow.set_tracking_uri(swept["uri"])
    model = mlflow.pyfunc.load_model("models:/swept@challenger")
    out = model.predict(torch.zeros(2, 28, 28).numpy())
    assert list(out.columns) == ["label", "probabilities", "confidence", "abstain"]
    assert len(out) == 2
    # The best trial's model carries its abstain threshold, chosen on validation like any.
    assert_abstention_logged(client, swept["best_run_id"])


def test_joining_with_a_different_definition_is_refused(swept, monkeypatch):
    monkeypatch.chdir(swept["folder"])
    result = run_cli(
        "sweep", "--study", "s1", "--storage", str(swept["storage"]), "--epochs", "1",
        "--tracking-uri", swept["uri"],
    )  # fmt: skip
    assert result.exit_code == 1
    assert "Study 's1' was started with" in result.stderr and "epochs=2" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lr: {low: 0.1, high: 0.01}\n", "lr in {} needs low < high"),
        ("momentum: [0.9]\n", "Unknown parameter 'momentum' in {}; choose from: lr"),
        ("lr: {low: 0, high: 0.1, log: true}\n", "low must be positive"),
        ("batch_size: [64, 0]\n", "batch_size in {} must be at least 1, got 0"),
        ("width: [8.5]\n", "width in {} must list whole numbers"),
        ("lr: fast\n", "lr in {} must be a list of values or a mapping"),
        ("[1, 2]\n", "{} must map parameter names"),
        ("lr: [0.1\n", "{} is not valid YAML at line"),
        ("{}\n", "{} is empty"),
    ],
)
def test_bad_space_files_get_one_sentence(tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    space = tmp_path / "space.yaml"
    space.write_text(text)
    result = run_cli("sweep", "--space", str(space), "--tracking-uri", f"sqlite:///{tmp_path}/m.db")
    assert result.exit_code == 1
    assert message.format(space) in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
    # Refused before anything was created.
    assert not (tmp_path / "m.db").exists() and not (tmp_path / DEFAULT_STORAGE).exists()


def test_width_is_refused_for_networks_without_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cli("sweep", "--preset", "classic", "--tracking-uri", f"sqlite:///{tmp_path}/m.db")
    assert result.exit_code == 1 and "width applies only to the fast network" in result.stderr


def test_trials_get_an_epoch_to_prune_at_unless_told_otherwise():
    # The fast preset trains one epoch; a pruner needs one before the last to decide at.
    assert preset_config("fast").epochs == 1
    assert SweepDefinition().trial_epochs() == 2
    assert SweepDefinition(pruner="none").trial_epochs() == 1
    assert SweepDefinition(epochs=1).trial_epochs() == 1
    assert SweepDefinition(preset="quality").trial_epochs() == 12
    assert SweepDefinition().base_config().epochs == 2


def test_fast_net_default_width_is_the_preset_network():
    shapes = [tuple(p.shape) for p in models.FastNet().parameters()]
    assert shapes == [
        (24, 1, 5, 5),
        (24,),
        (48, 24, 5, 5),
        (48,),
        (96, 1200),
        (96,),
        (10, 96),
        (10,),
    ]
    assert models.build("fast").width == models.FAST_WIDTH == 24
    wide = models.FastNet(width=32)
    assert wide(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


# -- several workers and commands on PostgreSQL -----------------------------------------------


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL 15 for the session, on a free loopback port."""
    try:
        with servers.postgres() as url:
            yield url
    except RuntimeError as e:  # no PostgreSQL server programs on this machine
        pytest.skip(str(e))


def _no_run_left_running(client: MlflowClient, experiment_id: str) -> None:
    statuses = {r.info.status for r in client.search_runs([experiment_id])}
    assert "RUNNING" not in statuses, statuses


@pytest.mark.slow
def test_two_workers_share_one_study_on_postgresql(postgres_url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_cli(
        "sweep", "--study", "pg-workers", "--storage", postgres_url, "--trials", "4",
        "--workers", "2", *SLICE, "--tracking-uri", uri, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    summary = result.json()
    client = MlflowClient(uri)
    runs = children(client, summary)
    assert len(runs) == 4
    assert len({r.data.tags["sweep_worker"] for r in runs}) == 2
    study = optuna.load_study(study_name="pg-workers", storage=postgres_url)
    assert len(study.trials) == 4
    assert study.user_attrs["parent_run_id"] == summary["parent_run_id"]
    _no_run_left_running(client, summary["experiment_id"])


@pytest.mark.slow
def test_separately_started_commands_join_one_study_and_one_parent(postgres_url, tmp_path, spawn):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # MLflow's SQLite store creates its tables on first use, which two processes starting
    # at once would race on; the study set-up itself is serialised by the sweep.
    made(uri)
    args = [
        *MNISTFLOW, "sweep", "--study", "pg-commands", "--storage", postgres_url,
        "--trials", "2", *SLICE, "--tracking-uri", uri, "--json",
    ]  # fmt: skip
    procs = [spawn(args, cwd=tmp_path) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, stderr) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, stderr
    summaries = [sweep_json(stdout) for stdout, _ in outputs]
    assert summaries[0]["parent_run_id"] == summaries[1]["parent_run_id"]
    client = MlflowClient(uri)
    assert len(children(client, summaries[0])) == 4
    parents = client.search_runs(
        [summaries[0]["experiment_id"]], filter_string="tags.sweep_role = 'parent'"
    )
    assert [p.info.run_id for p in parents] == [summaries[0]["parent_run_id"]]
    assert len(optuna.load_study(study_name="pg-commands", storage=postgres_url).trials) == 4


def sweep_json(stdout: str) -> dict[str, Any]:
    import json

    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_ctrl_c_kills_running_trials_and_a_later_command_resumes(tmp_path, spawn, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["--study", "stopped", "--tracking-uri", uri]
    # The store exists before the command starts: polling it below while MLflow creates its
    # tables in the command would race on the table creation.
    client = MlflowClient(uri)
    client.search_experiments()
    proc = spawn(
        [*MNISTFLOW, "sweep", *common, "--trials", "20", "--workers", "2", *SLICE], cwd=tmp_path
    )
    deadline = time.monotonic() + 300
    running: list[Any] = []
    while not running:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(1)
        experiment = client.get_experiment_by_name("mnist")
        if experiment is not None:
            runs = client.search_runs([experiment.experiment_id])
            running = [
                r for r in runs if r.info.status == "RUNNING" and "trial_number" in r.data.tags
            ]
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    experiment_id = experiment.experiment_id
    parent = client.search_runs([experiment_id], filter_string="tags.sweep_role = 'parent'")[0]
    assert parent.info.status == "KILLED"
    killed = client.search_runs([experiment_id], filter_string="tags.trial_state = 'killed'")
    assert killed and all(r.info.status == "KILLED" for r in killed)
    _no_run_left_running(client, experiment_id)

    monkeypatch.chdir(tmp_path)
    resumed = run_cli("sweep", *common, "--trials", "1", "--json")
    assert resumed.exit_code == 0, resumed.stderr
    assert resumed.json()["parent_run_id"] == parent.info.run_id
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


@pytest.mark.parametrize("during", ["start_run", "end_run"])
def test_an_interrupt_while_a_trial_run_starts_or_ends_leaves_it_ended(
    during: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The worker's SIGTERM landing inside mlflow.start_run (the run created, not yet
    returned) or end_run (not yet written): a window a loaded machine widens, where the run
    used to stay RUNNING for good. The interrupt is held until the start or the end is
    through: the run ends (KILLED when it was starting), then the interrupt is raised."""
    from mnistflow.config import TrackingConfig
    from mnistflow.sweep import workers

    uri = made(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("trials")
    parent = client.create_run(experiment_id)
    real = getattr(mlflow, during)

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        if during == "start_run":
            started = real(*args, **kwargs)  # the run exists in the store...
            os.kill(os.getpid(), signal.SIGTERM)  # ...and the signal comes before the return
            return started
        os.kill(os.getpid(), signal.SIGTERM)  # inside end_run, before it writes
        return real(*args, **kwargs)

    monkeypatch.setattr(mlflow, during, interrupted)
    previous = signal.signal(signal.SIGTERM, workers._Interrupt.handle)
    config = TrackingConfig(
        tracking_uri=uri, experiment="trials", system_metrics=False,
        parent_run_id=parent.info.run_id,
    )  # fmt: skip
    try:
        with pytest.raises(KeyboardInterrupt), workers.TrialRun(config):
            pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
    (trial,) = client.search_runs([experiment_id], filter_string="tags.mlflow.parentRunId != ''")
    assert trial.info.status == ("KILLED" if during == "start_run" else "FINISHED")


def test_joining_again_registers_the_same_best_once(swept, tmp_path, monkeypatch):
    # A copy of the finished study and store, so the other tests see the sweep as it was.
    for name in ("mlflow.db", "study.log", "space.yaml"):
        shutil.copyfile(swept["folder"] / name, tmp_path / name)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = optuna.load_study(study_name="s1", storage=journal(tmp_path / "study.log"))
    study.enqueue_trial({"lr": LRS[-1]})  # hopeless: the best stays the best
    monkeypatch.chdir(tmp_path)
    result = run_cli(
        "sweep", "--study", "s1", "--storage", str(tmp_path / "study.log"), "--trials", "1",
        "--space", str(tmp_path / "space.yaml"), *SLICE, "--tracking-uri", uri,
        "--register", "--model-name", "swept", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert result.json()["best_run_id"] == swept["best_run_id"]
    assert result.json()["registered_version"] == "1"
    versions = MlflowClient(uri).search_model_versions("name='swept'")
    assert [str(v.version) for v in versions] == ["1"]
