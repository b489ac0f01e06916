"""Held-out metrics (transfuse.metrics, numpy only): accuracy, per-row and mean NLL, the reliability bins, ECE,
the confusion matrix and evaluate, against values computed by hand on small arrays; balanced accuracy, macro F1
and recall per class against scikit-learn's on random cases; a clear ValueError when the probabilities do not
match the labels."""

from __future__ import annotations

import numpy as np
import pytest

from transfuse.metrics import (accuracy, balanced_accuracy, confusion, ece, evaluate, macro_f1, nll, recall_per_class,
                               reliability, row_nll)

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
    """Predictions 0, 2, 0, 0: recall 1/1, 0/2, 1/1 (balanced accuracy 2/3); F1 per class 2*1/(2*1+2+0) = 0.5,
    0 and 2*1/(2*1+0+0) = 1 (macro F1 0.5); recall keyed by class name, or by id without names."""
    assert evaluate(PROBS, LABELS) == {"accuracy": 0.5, "nll": pytest.approx(nll(PROBS, LABELS), rel=1e-15),
                                       "ece": pytest.approx(0.525, abs=1e-12), "n": 4,
                                       "balanced_accuracy": pytest.approx(2 / 3, abs=1e-15),
                                       "macro_f1": pytest.approx(0.5, abs=1e-15),
                                       "per_class_recall": {"0": 1.0, "1": 0.0, "2": 1.0}}
    named = evaluate(PROBS, LABELS, ["cat", "dog", "emu"])
    assert named["per_class_recall"] == {"cat": 1.0, "dog": 0.0, "emu": 1.0}
    with pytest.raises(ValueError, match=r"2 class names \['cat', 'dog'\] for probabilities over 3 classes"):
        evaluate(PROBS, LABELS, ["cat", "dog"])


def _random_case(seed: int, n: int, k: int, absent: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Random probabilities and labels; classes in ``absent`` never occur among the labels (but may be predicted)."""
    rng = np.random.default_rng(seed)
    present = [c for c in range(k) if c not in absent]
    labels = rng.choice(present, size=n, p=rng.dirichlet(np.ones(len(present))))
    probs = rng.dirichlet(np.full(k, 0.5), size=n)
    probs[np.arange(n), labels] += rng.uniform(0, 0.6, n)  # better than chance, not perfect
    return probs / probs.sum(1, keepdims=True), labels


@pytest.mark.parametrize("seed,n,k,absent", [(0, 200, 3, ()), (1, 57, 5, ()), (2, 300, 10, ()), (3, 40, 4, (2,)),
                                             (4, 9, 6, (0, 5))])
def test_balanced_accuracy_macro_f1_and_recall_match_scikit_learn(seed, n, k, absent):
    """On random cases, including classes absent from the labels: balanced accuracy, macro F1 and recall per class
    are scikit-learn's (an absent class: recall None in evaluate, and left out of balanced accuracy)."""
    import warnings

    from sklearn.metrics import balanced_accuracy_score, f1_score, recall_score

    probs, labels = _random_case(seed, n, k, absent)
    pred = probs.argmax(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn's notes on predicted classes absent from y_true
        want_bal = balanced_accuracy_score(labels, pred)
        want_f1 = f1_score(labels, pred, average="macro", zero_division=0.0)
        want_recall = recall_score(labels, pred, labels=list(range(k)), average=None, zero_division=np.nan)
    assert balanced_accuracy(probs, labels) == pytest.approx(want_bal, abs=1e-12)
    assert macro_f1(probs, labels) == pytest.approx(want_f1, abs=1e-12)
    np.testing.assert_allclose(recall_per_class(probs, labels), want_recall, atol=1e-12, equal_nan=True)
    got = evaluate(probs, labels, [f"c{i}" for i in range(k)])
    assert got["balanced_accuracy"] == pytest.approx(want_bal, abs=1e-12)
    assert got["macro_f1"] == pytest.approx(want_f1, abs=1e-12)
    assert list(got["per_class_recall"]) == [f"c{i}" for i in range(k)]
    missing = set(range(k)) - set(labels.tolist())  # the absent classes, and any a small draw left out
    assert set(absent) <= missing
    for i in range(k):
        r = got["per_class_recall"][f"c{i}"]
        assert (r is None) if i in missing else r == pytest.approx(want_recall[i], abs=1e-12)


def test_majority_guesser_scores_one_over_k_in_balanced_accuracy():
    """Always predicting the largest class: accuracy is its share (0.9 here), balanced accuracy 1/K."""
    labels = np.array([0] * 90 + [1] * 5 + [2] * 5)
    probs = np.tile([0.8, 0.1, 0.1], (100, 1))
    assert accuracy(probs, labels) == pytest.approx(0.9)
    assert balanced_accuracy(probs, labels) == pytest.approx(1 / 3)
    assert macro_f1(probs, labels) == pytest.approx((2 * 90 / (2 * 90 + 10)) / 3)


@pytest.mark.parametrize("fn", [accuracy, row_nll, nll, reliability, ece, confusion, evaluate, balanced_accuracy,
                                macro_f1, recall_per_class])
def test_probabilities_that_do_not_match_the_labels_are_refused(fn):
    with pytest.raises(ValueError, match=r"probs must be N x classes matching 4 labels, got shape \(3, 3\)"):
        fn(PROBS[:3], LABELS)
    with pytest.raises(ValueError, match=r"probs must be N x classes matching 4 labels, got shape \(4,\)"):
        fn(PROBS[:, 0], LABELS)
