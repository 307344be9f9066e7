"""The README's main job on the full MNIST set: the default preset reaches 99.0% and the
pipeline leaves a champion chosen by evaluation. Slow (about a minute on 2 cores)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mnistflow import registry


@pytest.mark.slow
def test_pipeline_on_full_mnist_reaches_99_percent_and_crowns_a_champion(
    store: str, tmp_path: Path, cli
):
    result = cli("pipeline", "--tracking-uri", store, "--json")
    assert result.exit_code == 0, result.stderr
    outcome = result.json()
    assert outcome["train"]["test_accuracy"] >= 0.99
    assert outcome["train"]["train_seconds"] < outcome["train"]["total_seconds"]
    assert outcome["promotion"]["promoted"] is True
    client = MlflowClient(store)
    assert registry.alias_version(client, "mnist", "champion") == "1"
    assert outcome["samples"]["correct"] >= 9
    assert len(list((tmp_path / "sample-digits").glob("*.png"))) == 10
