"""Experiments: made beside their store, and marked as model training for MLflow's UI."""

from __future__ import annotations

import os
import uuid

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mnistflow.store.uris import sqlite_path

# The experiment tag MLflow's UI reads to pick its view, and its model-training value
# (mlflow/server/js: ExperimentKind.CUSTOM_MODEL_DEVELOPMENT).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"


def project_run_id() -> str | None:
    """The run an MLflow Project started for this process, if any.

    `mlflow run` and `mlflow.projects.run` create the run themselves and pass its id in
    MLFLOW_RUN_ID; mlflow.start_run() resumes that run (and removes the variable).
    """
    return os.environ.get("MLFLOW_RUN_ID") or None


def use_experiment(name: str) -> str:
    """Make name the active experiment (created when missing), marked as model training in
    the MLflow UI; returns its id.

    Under an MLflow Project the run already exists, in the experiment given to `mlflow run
    --experiment-name`: that experiment stays active (setting another would make start_run
    refuse to resume the run) and its id is returned.
    """
    uri = str(mlflow.get_tracking_uri())
    client = MlflowClient(uri)
    if (run_id := project_run_id()) is not None:
        return str(client.get_run(run_id).info.experiment_id)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        experiment_id = create_experiment(client, uri, name)
    else:
        experiment_id = experiment.experiment_id
        kind = experiment.tags.get(EXPERIMENT_KIND_TAG)
        # Without the tag, MLflow 3's UI opens an experiment in its GenAI view (traces,
        # judges); the UI records its own guesses as "*_inferred". A kind someone chose stays.
        if kind is None or kind.endswith("_inferred") or kind == "no_inferred_type":
            client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    mlflow.set_experiment(experiment_id=experiment_id)
    return str(experiment_id)


def create_experiment(client: MlflowClient, uri: str, name: str) -> str:
    location = None
    database = sqlite_path(uri)
    if database is not None:
        # Beside the database: MLflow's default is ./mlruns in whatever folder the command
        # runs in, a second store the user did not ask for when the database is elsewhere.
        location = str(database.parent / "mlruns" / uuid.uuid4().hex)
    try:
        return str(
            client.create_experiment(
                name,
                artifact_location=location,
                tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND},
            )
        )
    except MlflowException as e:
        # Another process created it a moment ago.
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        existing = client.get_experiment_by_name(name)
        if existing is None:
            raise
        return str(existing.experiment_id)
