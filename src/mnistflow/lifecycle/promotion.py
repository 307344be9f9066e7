"""Promote by evidence: evaluate @challenger and @champion on the test set with MLflow's
model evaluation, validate the challenger against thresholds, and only then move @champion.

Three rules, each checked by ``mlflow.validate_evaluation_results``:
  1. the challenger's accuracy is at least ``min_accuracy`` (an absolute floor);
  2. its accuracy on digits by writers outside MNIST (data/writers.py) is at least
     ``min_writers_accuracy``: a second floor, so that a model tuned to MNIST's own
     writers alone is not served (skipped where that set is not installed);
  3. it is not worse than the champion's accuracy, measured now on the same images, by
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
# The second floor: the fast preset scores about 95% on other writers' digits (README).
MIN_WRITERS_ACCURACY = 0.9


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


def _test_dataset(split: data.Split, name: str = "mnist-test") -> Any:
    """A split as the MLflow dataset that evaluate() logs as the run's input, its schema
    given: MLflow would infer it by checking each of its 7.9 million cells for a missing value,
    one Python call each (about 27 s of the 50 s a promotion took here)."""
    frame = _pixel_frame(split.images.numpy())
    frame["label"] = split.labels.numpy()
    dataset = from_pandas(frame, targets="label", name=name)
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
    min_writers_accuracy: float = MIN_WRITERS_ACCURACY,
    data_config: DataConfig | None = None,
    test: data.Split | None = None,
    writers: data.Split | None = None,
) -> Decision:
    """Evaluate the challenger (version, else @challenger) and the champion on the test set;
    move @champion to the challenger only if it passes. A refusal leaves every alias as it
    was.

    tracking_uri: the store holding the registry and receiving the evaluation runs.
    test, writers: the test split and the other-writers split (None: no second floor) when
    the caller has loaded the data already; without test, both are loaded here.
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

    if test is None:
        loaded = data.load(data_config or DataConfig())
        test, writers = loaded.test, loaded.writers
    test_set = _test_dataset(test)  # once: its digest hashes every pixel (2.7 s)
    writers_set = None if writers is None else _test_dataset(writers, "other-writers")

    with _fluent_store(tracking_uri):
        experiments.use_experiment(EXPERIMENT)  # marked as model training in the UI
        with _run(f"promote {name} v{challenger}") as parent:
            mlflow.log_params(
                {
                    "model_name": name,
                    "challenger_version": challenger,
                    "champion_version": champion or "none",
                    "min_accuracy": min_accuracy,
                    "min_writers_accuracy": min_writers_accuracy,
                    "margin": margin,
                    "test_size": len(test),
                    "writers_size": 0 if writers is None else len(writers),
                }
            )
            rules = Rules(min_accuracy, min_writers_accuracy, margin)
            promoted, reason, evidence = _decide(
                client, name, challenger, champion, test_set, writers_set, rules
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


@dataclass(frozen=True)
class Rules:
    min_accuracy: float
    min_writers_accuracy: float
    margin: float


def _decide(
    client: MlflowClient,
    name: str,
    challenger: str,
    champion: str | None,
    test_set: Any,
    writers_set: Any | None,
    rules: Rules,
) -> tuple[bool, str, list[Evidence]]:
    """Evaluate, validate, and move the aliases; returns (promoted, reason, evidence)."""
    candidate, candidate_result = _evaluate(client, name, challenger, "challenger", test_set)
    evidence = [candidate]
    accuracy = candidate.metrics["accuracy_score"]

    def refuse(reason: str) -> tuple[bool, str, list[Evidence]]:
        client.set_model_version_tag(name, challenger, "promotion_refused", reason)
        return False, reason, evidence

    if not _passes(candidate_result, rules.min_accuracy):
        return refuse(
            f"v{challenger} accuracy {accuracy:.4f} is below the minimum {rules.min_accuracy:.4f}."
        )
    if writers_set is not None:
        others, others_result = _evaluate(
            client, name, challenger, "challenger, other writers", writers_set
        )
        evidence.append(others)
        if not _passes(others_result, rules.min_writers_accuracy):
            return refuse(
                f"v{challenger} accuracy on other writers' digits "
                f"{others.metrics['accuracy_score']:.4f} is below the minimum "
                f"{rules.min_writers_accuracy:.4f}."
            )
    incumbent = None
    if champion is not None and champion != challenger:
        incumbent, _ = _evaluate(client, name, champion, "champion", test_set)
        evidence.append(incumbent)
        if not _passes(candidate_result, incumbent.metrics["accuracy_score"] - rules.margin):
            return refuse(
                f"v{challenger} accuracy {accuracy:.4f} is worse than champion v{champion} "
                f"({incumbent.metrics['accuracy_score']:.4f}) by more than {rules.margin:.4f}."
            )

    if champion == challenger:
        # Promoting the champion again would repeat it in the history: rollback would then
        # "roll back" to the same version.
        return (
            False,
            f"v{challenger} is already @champion (accuracy {accuracy:.4f}); nothing changed.",
            evidence,
        )
    floors = f"at least {rules.min_accuracy:.4f}"
    if writers_set is not None:
        floors += f" ({evidence[1].metrics['accuracy_score']:.4f} on other writers' digits)"
    if incumbent is not None:
        reason = (
            f"v{challenger} accuracy {accuracy:.4f} is {floors} and within "
            f"{rules.margin:.4f} of champion v{champion} "
            f"({incumbent.metrics['accuracy_score']:.4f})."
        )
    else:
        reason = f"v{challenger} accuracy {accuracy:.4f} is {floors} and there is no champion yet."
    registry.make_champion(client, name, challenger, reason)
    # @challenger may name another version registered meanwhile, never evaluated: it stays.
    if registry.alias_version(client, name, registry.CHALLENGER) == challenger:
        client.delete_registered_model_alias(name, registry.CHALLENGER)
    return True, reason, evidence


def _passes(result: EvaluationResult, floor: float) -> bool:
    """Whether an evaluation's accuracy is at least floor, as MLflow's validation judges."""
    try:
        mlflow.validate_evaluation_results(
            {"accuracy_score": MetricThreshold(threshold=floor, greater_is_better=True)}, result
        )
    except ModelValidationFailedException:
        return False
    return True
