"""Held-out metrics (transfuse.metrics, numpy only): accuracy, per-row and mean NLL, the reliability bins, ECE,
the confusion matrix and evaluate, against values computed by hand on small arrays; a clear ValueError when the
probabilities do not match the labels."""

from __future__ import annotations

import numpy as np
import pytest

from transfuse.metrics import accuracy, confusion, ece, evaluate, nll, reliability, row_nll

# Four rows, three classes: two right (confidence 0.7 and 0.6), two wrong (0.5, and 0.9 with a true-class
# probability of exactly 0).
LABELS = np.array([0, 2, 1, 1])
PROBS = np.array([[0.7, 0.2, 0.1],  # predicted 0, right
                  [0.1, 0.3, 0.6],  # predicted 2, right
                  [0.5, 0.4, 0.1],  # predicted 0, wrong
                  [0.9, 0.0, 0.1]])  # predicted 0, wrong, true class at 0


def test_metrics_on_known_cases():
    labels = np.array([0, 1, 1, 0])
    perfect = np.eye(2)[labels]
    assert evaluate(perfect, labels)["accuracy"] == 1.0
    assert nll(perfect, labels) < 1e-9 and ece(perfect, labels) < 1e-9
    half = np.full((4, 2), 0.5)
    assert nll(half, labels) == pytest.approx(np.log(2))
    overconfident = np.array([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]])
    assert ece(overconfident, labels) == pytest.approx(0.4, abs=1e-9)  # confidence 0.9, accuracy 0.5


def test_accuracy_and_nll_by_hand():
    assert accuracy(PROBS, LABELS) == 0.5
    # natural log of each row's true-class probability, the 0 floored at 1e-12
    want = np.array([-np.log(0.7), -np.log(0.6), -np.log(0.4), 12 * np.log(10)])
    np.testing.assert_allclose(row_nll(PROBS, LABELS), want, rtol=1e-12)
    assert nll(PROBS, LABELS) == pytest.approx(want.mean(), rel=1e-12)
    assert accuracy(PROBS.tolist(), LABELS.astype(np.float64)) == 0.5  # lists and float labels are converted


def test_reliability_bins_and_ece_by_hand():
    """Two bins, [0, 0.5] and (0.5, 1]: confidence 0.5 falls in the first (alone, wrong); 0.7, 0.6 and 0.9 in the
    second (mean 2.2 / 3, two of three right). ECE = (1 * |0.5 - 0| + 3 * |2.2/3 - 2/3|) / 4 = 0.175."""
    r = reliability(PROBS, LABELS, bins=2)
    assert r["edges"] == [0.0, 0.5, 1.0] and r["count"] == [1.0, 3.0]
    assert r["confidence"] == pytest.approx([0.5, 2.2 / 3]) and r["accuracy"] == pytest.approx([0.0, 2 / 3])
    assert ece(PROBS, LABELS, bins=2) == pytest.approx(0.175, abs=1e-12)
    # 15 bins (the default): every row alone in its bin, so ECE is the mean |confidence - correct|
    assert ece(PROBS, LABELS) == pytest.approx((0.3 + 0.4 + 0.5 + 0.9) / 4, abs=1e-12)


def test_reliability_bin_edges_and_empty_bins():
    """Bins are closed on the right (0.25 is in the first of four), confidence 1.0 is in the last, and an empty
    bin reports count 0 with confidence and accuracy 0."""
    probs = np.array([[0.25, 0.25, 0.25, 0.25], [0.26, 0.24, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
    r = reliability(probs, np.array([0, 1, 0]), bins=4)
    assert r["count"] == [1.0, 1.0, 0.0, 1.0]
    assert r["confidence"] == pytest.approx([0.25, 0.26, 0.0, 1.0])
    assert r["accuracy"] == [1.0, 0.0, 0.0, 1.0]


def test_confusion_rows_are_true_classes_and_columns_predictions():
    assert confusion(PROBS, LABELS) == [[1, 0, 0], [2, 0, 0], [0, 0, 1]]
    assert np.sum(confusion(PROBS, LABELS)) == len(LABELS)


def test_evaluate_collects_the_scores():
    assert evaluate(PROBS, LABELS) == {"accuracy": 0.5, "nll": pytest.approx(nll(PROBS, LABELS), rel=1e-15),
                                       "ece": pytest.approx(0.525, abs=1e-12), "n": 4}


@pytest.mark.parametrize("fn", [accuracy, row_nll, nll, reliability, ece, confusion, evaluate])
def test_probabilities_that_do_not_match_the_labels_are_refused(fn):
    with pytest.raises(ValueError, match=r"probs must be N x classes matching 4 labels, got shape \(3, 3\)"):
        fn(PROBS[:3], LABELS)
    with pytest.raises(ValueError, match=r"probs must be N x classes matching 4 labels, got shape \(4,\)"):
        fn(PROBS[:, 0], LABELS)
