"""Promote by evidence: evaluate @challenger and @champion on the test set with MLflow's
model evaluation, validate the challenger against thresholds, and only then move @champion.

Two rules, both checked by ``mlflow.validate_evaluation_results``:
  1. the challenger's accuracy is at least ``min_accuracy`` (an absolute floor);
  2. it is not worse than the champion's accuracy, measured now on the same images, by
     more than ``margin``. MLflow's MetricThreshold only takes positive changes against a
     baseline, so this rule is the threshold ``champion accuracy - margin``.
Each evaluation is a nested run under one "promote" run, so the decision, its reason and
the evidence sit together in the tracking store.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import EvaluationResult, MetricThreshold
from mlflow.models.evaluation.validation import ModelValidationFailedException
from mlflow.tracking import MlflowClient

from mnistflow import data, registry, tracking
from mnistflow.config import MODEL_NAME, DataConfig, MnistflowError

EXPERIMENT = "mnist-promotion"


@dataclass
class Evidence:
    version: str
    role: str  # "challenger" or "champion"
    metrics: dict[str, float]
    run_id: str


@dataclass
class Decision:
    promoted: bool
    reason: str
    model_name: str
    challenger_version: str
    champion_version: str | None  # after the decision
    previous_champion_version: str | None
    evaluation_run_id: str
    evidence: list[Evidence] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pixel_frame(images: np.ndarray) -> pd.DataFrame:
    flat = images.reshape(len(images), 784).astype(np.float32)
    return pd.DataFrame(flat, columns=[f"px{i}" for i in range(784)])


def _evaluate(
    name: str, version: str, role: str, frame: pd.DataFrame
) -> tuple[Evidence, EvaluationResult]:
    """mlflow.models.evaluate of one registered version, in a nested run."""
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    classifier = model.unwrap_python_model()

    def predict(features: pd.DataFrame) -> np.ndarray:
        # evaluate() hands over the pixel columns as a table; the model wants digits.
        labels, _ = classifier.classify(features.to_numpy(np.float32).reshape(-1, 28, 28))
        return np.asarray(labels)

    with (
        mlflow.start_run(run_name=f"evaluate {name} v{version} ({role})", nested=True) as run,
        warnings.catch_warnings(),
    ):
        # MLflow hints that the integer label column cannot hold missing values; it never will.
        warnings.filterwarnings("ignore", "Hint: Inferred schema contains integer column")
        mlflow.set_tags({"model_name": name, "model_version": version, "role": role})
        result = mlflow.models.evaluate(
            model=predict,
            data=frame,
            targets="label",
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
    name: str = MODEL_NAME,
    version: str | None = None,
    min_accuracy: float = 0.99,
    margin: float = 0.002,
    data_config: DataConfig | None = None,
    client: MlflowClient | None = None,
) -> Decision:
    """Evaluate the challenger (version, else @challenger) and the champion; move @champion
    to the challenger only if it passes. A refusal leaves every alias as it was."""
    client = client or MlflowClient()
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

    test = data.load(data_config or DataConfig()).test
    frame = _pixel_frame(test.images.numpy())
    frame["label"] = test.labels.numpy()

    # Under an MLflow Project (`mlflow run . -e promote`) the decision is the project's run.
    tracking.use_experiment(EXPERIMENT)
    with mlflow.start_run(run_name=f"promote {name} v{challenger}") as parent:
        mlflow.log_params(
            {
                "model_name": name,
                "challenger_version": challenger,
                "champion_version": champion or "none",
                "min_accuracy": min_accuracy,
                "margin": margin,
            }
        )
        candidate, candidate_result = _evaluate(name, challenger, "challenger", frame)
        evidence = [candidate]
        thresholds = {
            "accuracy_score": MetricThreshold(threshold=min_accuracy, greater_is_better=True)
        }
        reason = ""
        try:
            mlflow.validate_evaluation_results(thresholds, candidate_result)
            if champion is not None and champion != challenger:
                incumbent, _ = _evaluate(name, champion, "champion", frame)
                evidence.append(incumbent)
                floor = incumbent.metrics["accuracy_score"] - margin
                mlflow.validate_evaluation_results(
                    {"accuracy_score": MetricThreshold(threshold=floor, greater_is_better=True)},
                    candidate_result,
                )
                reason = (
                    f"v{challenger} accuracy {candidate.metrics['accuracy_score']:.4f} is at least "
                    f"{min_accuracy:.4f} and within {margin:.4f} of champion v{champion} "
                    f"({incumbent.metrics['accuracy_score']:.4f})."
                )
            else:
                reason = (
                    f"v{challenger} accuracy {candidate.metrics['accuracy_score']:.4f} is at "
                    f"least {min_accuracy:.4f}"
                    + (" and there is no champion yet." if champion is None else ".")
                )
            promoted = True
        except ModelValidationFailedException:
            promoted = False
            reason = _refusal(challenger, evidence, min_accuracy, margin)

        if promoted:
            registry.make_champion(client, name, challenger, reason)
            client.delete_registered_model_alias(name, registry.CHALLENGER)
        else:
            client.set_model_version_tag(name, challenger, "promotion_refused", reason)
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
