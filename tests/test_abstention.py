"""The abstain threshold and its measures (lifecycle/abstention.py), on probabilities whose
answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from mnistflow.lifecycle import abstention


def rows(confidences: list[float], labels: list[int]) -> np.ndarray:
    """(N, 10) probabilities: the given confidence on the given label, the rest spread."""
    out = np.empty((len(confidences), 10), dtype=np.float32)
    for i, (sure, label) in enumerate(zip(confidences, labels, strict=True)):
        out[i] = (1 - sure) / 9
        out[i, label] = sure
    return out


def test_the_threshold_turns_away_the_given_share_of_validation_digits():
    sure = np.linspace(0.5, 0.99, 100)
    val = rows(list(sure), [3] * 100)
    below = abstention.threshold(val, 0.05)
    assert below in np.float32(sure)  # a confidence the model gave, not an interpolation
    assert (abstention.confidences(val) < below).sum() == 4  # strictly under: at most 5%
    assert abstention.threshold(val, 0.0) == 0.0  # never abstain
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        abstention.threshold(val, 1.0)


def test_measure_chooses_on_validation_and_reports_test_and_non_digits():
    val = rows([0.95] * 98 + [0.3, 0.4], [1] * 100)
    # Test: two unsure digits, one of them wrong; the confident ones all right.
    test = rows([0.9, 0.9, 0.2, 0.35], [1, 2, 5, 4])
    labels = np.array([1, 2, 7, 4])
    clothes = rows([0.2, 0.25, 0.92, 0.3], [0, 1, 2, 3])
    judged = abstention.measure(val, test, labels, clothes, rate=0.02)

    assert judged.below == pytest.approx(0.4)  # the 2nd-lowest of 100: 1 under it (1%)
    assert judged.metrics["abstain_below"] == judged.below
    assert judged.metrics["test_abstain_rate"] == 0.5
    assert judged.metrics["test_accuracy_answered"] == 1.0  # the wrong one was declined
    assert judged.metrics["nondigit_abstain_rate"] == 0.75
    # 4 digits x 4 clothes: the confident clothing image (0.92) beats all four digits; the
    # digits at 0.9, 0.9 and 0.35 beat the other three, the one at 0.2 ties with one (half).
    assert judged.metrics["nondigit_auroc"] == pytest.approx((3 + 3 + 3 + 0.5) / 16)

    without = abstention.measure(val, test, labels, None, rate=0.02)
    assert "nondigit_auroc" not in without.metrics and without.below == judged.below


def test_auroc_is_one_when_every_digit_is_surer_than_every_non_digit():
    assert abstention.auroc(np.array([0.9, 0.8]), np.array([0.5, 0.1])) == 1.0
    assert abstention.auroc(np.array([0.1]), np.array([0.5])) == 0.0
