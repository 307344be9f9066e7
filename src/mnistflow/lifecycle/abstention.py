"""Saying "not sure": how confident a model is in a digit, the threshold under which it
abstains, and how well its confidence tells digits from things that are not digits.

The confidence of a prediction is its top probability (the label's). The threshold is chosen
on the validation digits alone: the confidence under which ABSTAIN_RATE of them fall. It
travels with the logged model (model_config["abstain_below"]), so every way of serving the
model flags the same predictions; the non-digits (Fashion-MNIST, see data.read_nondigits)
only measure it, they never choose it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The share of validation digits the model may decline: measured on the fast preset, 2%
# of validation digits turn away 95% of Fashion-MNIST's images (1%: 89%; README).
ABSTAIN_RATE = 0.02
# The model_config key of the threshold, read by classifier_model.py and the server.
CONFIG_KEY = "abstain_below"


def confidences(probabilities: np.ndarray) -> np.ndarray:
    """(N, 10) probabilities -> (N,) top probability, in their dtype."""
    result: np.ndarray = np.asarray(probabilities).max(axis=1)
    return result


def threshold(val_probabilities: np.ndarray, rate: float = ABSTAIN_RATE) -> float:
    """The confidence under which at most `rate` of the validation digits fall."""
    if not 0 <= rate < 1:
        raise ValueError(f"the abstain rate must be in [0, 1), got {rate}")
    if rate == 0:
        return 0.0
    # A confidence the model gave (the empirical quantile, not an interpolation): exactly
    # the digits under it abstain, and the share under it is at most rate.
    return float(np.quantile(confidences(val_probabilities), rate, method="inverted_cdf"))


@dataclass(frozen=True)
class Abstention:
    """The threshold chosen for a model, and what it does on test digits and non-digits."""

    below: float
    metrics: dict[str, float]


def measure(
    val_probabilities: np.ndarray,
    test_probabilities: np.ndarray,
    test_labels: np.ndarray,
    nondigit_probabilities: np.ndarray | None,
    rate: float = ABSTAIN_RATE,
) -> Abstention:
    """Choose the threshold on validation, then measure it on the test digits and, where
    there are some, the non-digits (the metrics logged on every run)."""
    below = threshold(val_probabilities, rate)
    test_confidence = confidences(test_probabilities)
    answered = test_confidence >= below
    right = np.asarray(test_probabilities).argmax(axis=1) == np.asarray(test_labels)
    metrics = {
        "abstain_below": below,
        "test_abstain_rate": float(1 - answered.mean()),
        # Accuracy on the digits it answers; its errors are mostly among those it declines.
        "test_accuracy_answered": float(right[answered].mean()) if answered.any() else 0.0,
    }
    if nondigit_probabilities is not None and len(nondigit_probabilities):
        nondigit_confidence = confidences(nondigit_probabilities)
        metrics["nondigit_auroc"] = auroc(test_confidence, nondigit_confidence)
        metrics["nondigit_abstain_rate"] = float((nondigit_confidence < below).mean())
    return Abstention(below, metrics)


def auroc(digit_confidence: np.ndarray, nondigit_confidence: np.ndarray) -> float:
    """The chance that a digit gets more confidence than a non-digit (ties count half)."""
    from sklearn.metrics import roc_auc_score

    truth = np.r_[np.ones(len(digit_confidence)), np.zeros(len(nondigit_confidence))]
    scores = np.r_[digit_confidence, nondigit_confidence].astype(np.float64)
    return float(roc_auc_score(truth, scores))
