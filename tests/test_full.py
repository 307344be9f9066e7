"""The README's main job on the full MNIST set: the default preset reaches 99.0% and the
pipeline leaves a champion chosen by evaluation. Slow (about a minute on 2 cores)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mnistflow.config import preset_config
from mnistflow.lifecycle import registry
from mnistflow.store.experiments import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND


@pytest.mark.slow
def test_pipeline_on_full_mnist_reaches_99_percent_and_crowns_a_champion(
    store: str, tmp_path: Path, cli
):
    result = cli("pipeline", "--tracking-uri", store, "--json")
    assert result.exit_code == 0, result.stderr
    outcome = result.json()
    train = outcome["train"]
    assert train["test_accuracy"] >= 0.99
    client = MlflowClient(store)
    run = client.get_run(train["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["data.train_size"] == "55000"
    # Beyond MNIST's test set: other writers' digits (the promotion's second floor, 0.9)
    # and telling digits from Fashion-MNIST's clothes by confidence.
    assert run.data.metrics["writers_accuracy"] >= 0.9
    assert run.data.metrics["nondigit_auroc"] >= 0.95
    # train_seconds is the epochs' loops as logged, the README's training time.
    epochs = client.get_metric_history(train["run_id"], "epoch_seconds")
    assert [m.step for m in epochs] == list(range(1, preset_config("fast").epochs + 1))
    assert train["train_seconds"] == pytest.approx(sum(m.value for m in epochs))
    assert train["registered_model"] == "mnist" and train["registered_version"] == "1"

    promotion = outcome["promotion"]
    assert promotion["promoted"] is True and promotion["champion_version"] == "1"
    assert registry.alias_version(client, "mnist", "champion") == "1"
    evaluation = client.get_run(promotion["evaluation_run_id"])
    assert evaluation.data.tags["promoted"] == "true"
    for experiment_id in (run.info.experiment_id, evaluation.info.experiment_id):
        kind = client.get_experiment(experiment_id).tags.get(EXPERIMENT_KIND_TAG)
        assert kind == MODEL_TRAINING_KIND

    samples = outcome["samples"]
    assert samples["correct"] >= 9
    assert samples["correct"] == sum(
        t == p for t, p in zip(samples["true"], samples["predicted"], strict=True)
    )
    assert len(list((tmp_path / "sample-digits").glob("*.png"))) == 10
