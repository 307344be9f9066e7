"""Promote by evidence: evaluate @challenger and @champion on the test set with MLflow's
model evaluation, validate the challenger against thresholds, and only then move @champion.

Two rules, both checked by ``mlflow.validate_evaluation_results``:
  1. the challenger's accuracy is at least ``min_accuracy`` (an absolute floor);
  2. it is not worse than the champion's accuracy, measured now on the same images, by
     more than ``margin``. MLflow's MetricThreshold only takes positive changes against a
     baseline, so this rule is the threshold ``champion accuracy - margin``.
Each evaluation is a nested run under one "promote" run in the ``mnist-promotion``
experiment, so the decision, its reason and the evidence sit together in the tracking store.

The decision is made on the test set: one registered version against another, each once.
Choosing between many candidates (trials of a sweep, epochs) happens on the validation
split during training; choosing among many on the test set would overfit it.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.data.pandas_dataset import from_pandas
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.models import EvaluationResult, MetricThreshold
from mlflow.models.evaluation.validation import ModelValidationFailedException
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema, TensorSpec

from mnistflow import data
from mnistflow.config import MODEL_NAME, DataConfig, MnistflowError
from mnistflow.lifecycle import registry
from mnistflow.store import experiments

EXPERIMENT = "mnist-promotion"


@dataclass
class Evidence:
    version: str
    role: str  # "challenger" or "champion"
    metrics: dict[str, float]
    run_id: str


@dataclass
class Decision:
    promoted: bool  # whether @champion moved to the challenger
    reason: str
    model_name: str
    challenger_version: str
    champion_version: str | None  # after the decision
    previous_champion_version: str | None
    evaluation_run_id: str
    evidence: list[Evidence] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def _fluent_store(tracking_uri: str) -> Iterator[None]:
    """MLflow's fluent API (runs, evaluate, model loading) on tracking_uri for the block, and
    the process-wide URI as it was afterwards: mlflow.models.evaluate logs only to the
    active run of the global store."""
    was_set = mlflow.is_tracking_uri_set()
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous if was_set else None)  # type: ignore[arg-type]


@contextlib.contextmanager
def _run(run_name: str, nested: bool = False) -> Iterator[mlflow.ActiveRun]:
    """A fluent run that ends KILLED on Ctrl-C (MLflow's own context says FAILED)."""
    with mlflow.start_run(run_name=run_name, nested=nested) as run:
        try:
            yield run
        except KeyboardInterrupt:
            mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
            raise


def _pixel_frame(images: np.ndarray) -> pd.DataFrame:
    flat = images.reshape(len(images), 784).astype(np.float32)
    return pd.DataFrame(flat, columns=[f"px{i}" for i in range(784)])


def _test_dataset(frame: pd.DataFrame) -> Any:
    """The test set as the MLflow dataset that evaluate() logs as the run's input, its schema
    given: MLflow would infer it by checking each of its 7.9 million cells for a missing value,
    one Python call each (about 27 s of the 50 s a promotion took here)."""
    dataset = from_pandas(frame, targets="label", name="mnist-test")
    columns: list[ColSpec | TensorSpec] = [
        ColSpec("float", str(column)) for column in frame.columns if column != "label"
    ]
    # A cached property: set here, it is not inferred.
    dataset.schema = Schema([*columns, ColSpec("long", "label")])
    return dataset


def _evaluate(
    client: MlflowClient, name: str, version: str, role: str, test_set: Any
) -> tuple[Evidence, EvaluationResult]:
    """mlflow.models.evaluate of one registered version, in a nested run."""
    # Through the client's registry, not the process-wide one that models:/name/version uses.
    model = mlflow.pyfunc.load_model(client.get_model_version_download_uri(name, version))
    classifier = model.unwrap_python_model()

    def predict(features: pd.DataFrame) -> np.ndarray:
        # evaluate() hands over the pixel columns as a table; the model wants digits.
        labels, _ = classifier.classify(features.to_numpy(np.float32).reshape(-1, 28, 28))
        return np.asarray(labels)

    with (
        _run(f"evaluate {name} v{version} ({role})", nested=True) as run,
        warnings.catch_warnings(),
    ):
        # MLflow hints that the integer label column cannot hold missing values; it never will.
        warnings.filterwarnings("ignore", "Hint: Inferred schema contains integer column")
        mlflow.set_tags({"model_name": name, "model_version": version, "role": role})
        result = mlflow.models.evaluate(
            model=predict,
            data=test_set,
            model_type="classifier",
            evaluators=["default"],
            evaluator_config={
                # SHAP explanations of 784 pixel columns would take minutes and say little.
                "default": {"log_model_explainability": False, "label_list": list(range(10))}
            },
        )
    metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, int | float)}
    return Evidence(version, role, metrics, run.info.run_id), result


def promote(
    tracking_uri: str,
    name: str = MODEL_NAME,
    *,
    version: str | None = None,
    min_accuracy: float = 0.99,
    margin: float = 0.002,
    data_config: DataConfig | None = None,
    test: data.Split | None = None,
) -> Decision:
    """Evaluate the challenger (version, else @challenger) and the champion on the test set;
    move @champion to the challenger only if it passes. A refusal leaves every alias as it
    was.

    tracking_uri: the store holding the registry and receiving the evaluation runs.
    test: the test split when the caller has loaded MNIST already (else loaded here).
    """
    client = registry.client_for(tracking_uri)
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise MnistflowError(
            f"No registered model {name!r}; there is: {registry.describe_models(client)}."
        ) from None
    challenger = version or registry.alias_version(client, name, registry.CHALLENGER)
    if challenger is None:
        raise MnistflowError(
            f"{name} has no @challenger to promote; register a run (mnistflow register) or pass "
            "--version."
        )
    try:
        client.get_model_version(name, challenger)
    except MlflowException:
        raise MnistflowError(
            f"{name} has no version {challenger}; there is: {registry.describe_models(client)}."
        ) from None
    champion = registry.alias_version(client, name, registry.CHAMPION)

    test = test if test is not None else data.load(data_config or DataConfig()).test
    frame = _pixel_frame(test.images.numpy())
    frame["label"] = test.labels.numpy()
    test_set = _test_dataset(frame)  # once: its digest hashes every pixel (2.7 s)

    with _fluent_store(tracking_uri):
        experiments.use_experiment(EXPERIMENT)  # marked as model training in the UI
        with _run(f"promote {name} v{challenger}") as parent:
            mlflow.log_params(
                {
                    "model_name": name,
                    "challenger_version": challenger,
                    "champion_version": champion or "none",
                    "min_accuracy": min_accuracy,
                    "margin": margin,
                    "test_size": len(test),
                }
            )
            promoted, reason, evidence = _decide(
                client, name, challenger, champion, test_set, min_accuracy, margin
            )
            mlflow.set_tags({"promoted": str(promoted).lower(), "reason": reason})
            mlflow.log_metric("promoted", float(promoted))

    return Decision(
        promoted=promoted,
        reason=reason,
        model_name=name,
        challenger_version=challenger,
        champion_version=challenger if promoted else champion,
        previous_champion_version=champion,
        evaluation_run_id=parent.info.run_id,
        evidence=evidence,
    )


def _decide(
    client: MlflowClient,
    name: str,
    challenger: str,
    champion: str | None,
    test_set: Any,
    min_accuracy: float,
    margin: float,
) -> tuple[bool, str, list[Evidence]]:
    """Evaluate, validate, and move the aliases; returns (promoted, reason, evidence)."""
    candidate, candidate_result = _evaluate(client, name, challenger, "challenger", test_set)
    evidence = [candidate]
    accuracy = candidate.metrics["accuracy_score"]
    try:
        mlflow.validate_evaluation_results(
            {"accuracy_score": MetricThreshold(threshold=min_accuracy, greater_is_better=True)},
            candidate_result,
        )
        if champion is not None and champion != challenger:
            incumbent, _ = _evaluate(client, name, champion, "champion", test_set)
            evidence.append(incumbent)
            floor = incumbent.metrics["accuracy_score"] - margin
            mlflow.validate_evaluation_results(
                {"accuracy_score": MetricThreshold(threshold=floor, greater_is_better=True)},
                candidate_result,
            )
    except ModelValidationFailedException:
        reason = _refusal(challenger, evidence, min_accuracy, margin)
        client.set_model_version_tag(name, challenger, "promotion_refused", reason)
        return False, reason, evidence

    if champion == challenger:
        # Promoting the champion again would repeat it in the history: rollback would then
        # "roll back" to the same version.
        return (
            False,
            f"v{challenger} is already @champion (accuracy {accuracy:.4f}); nothing changed.",
            evidence,
        )
    if len(evidence) == 2:
        reason = (
            f"v{challenger} accuracy {accuracy:.4f} is at least {min_accuracy:.4f} and within "
            f"{margin:.4f} of champion v{champion} "
            f"({evidence[1].metrics['accuracy_score']:.4f})."
        )
    else:
        reason = (
            f"v{challenger} accuracy {accuracy:.4f} is at least {min_accuracy:.4f} and there is "
            "no champion yet."
        )
    registry.make_champion(client, name, challenger, reason)
    # @challenger may name another version registered meanwhile, never evaluated: it stays.
    if registry.alias_version(client, name, registry.CHALLENGER) == challenger:
        client.delete_registered_model_alias(name, registry.CHALLENGER)
    return True, reason, evidence


def _refusal(challenger: str, evidence: list[Evidence], min_accuracy: float, margin: float) -> str:
    """One sentence for a refusal (MLflow's own message is a multi-line report)."""
    accuracy = evidence[0].metrics["accuracy_score"]
    if accuracy < min_accuracy:
        return f"v{challenger} accuracy {accuracy:.4f} is below the minimum {min_accuracy:.4f}."
    champ = evidence[1]
    return (
        f"v{challenger} accuracy {accuracy:.4f} is worse than champion v{champ.version} "
        f"({champ.metrics['accuracy_score']:.4f}) by more than {margin:.4f}."
    )
