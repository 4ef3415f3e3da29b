"""Tests for evaluation.metrics: hand-computed FPR95 (authors' rule), sklearn agreement, errors."""
import itertools
import re

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from evaluation.metrics import (
    aupr_in,
    aupr_out,
    auroc,
    closed_set_accuracy,
    compute_metrics,
    fpr_at_95_tpr,
    fpr_at_95_tpr_interpolated,
)


def brute_force_fpr95(scores, is_known):
    """Literal loop version of the authors' rule, written independently of the implementation."""
    n_pos = int(np.sum(is_known))
    n_neg = len(is_known) - n_pos
    kept = []  # (recall, fp) from the highest threshold down to the first with full recall
    for t in sorted(set(scores.tolist()), reverse=True):
        accepted = scores >= t
        tp = int(np.sum(accepted & is_known))
        fp = int(np.sum(accepted & ~is_known))
        kept.append((tp / n_pos, fp))
        if tp == n_pos:
            break
    best_dist, best_fp = None, None
    for recall, fp in reversed(kept):
        dist = abs(recall - 0.95)
        if best_dist is None or dist < best_dist:
            best_dist, best_fp = dist, fp
    return best_fp / n_neg


def tie_example():
    """20 known, 10 unknown; the runs at scores 9, 8, 7 each hold one known and one unknown."""
    scores = np.array([10.0] * 17 + [9, 9, 8, 8, 7, 7] + [0.0] * 7)
    is_known = np.array([True] * 17 + [True, False] * 3 + [False] * 7)
    return scores, is_known


def test_fpr95_hand_example_with_ties():
    scores, is_known = tie_example()
    # Operating points (TP, FP): t=10 (17,0), t=9 (18,1), t=8 (19,2), t=7 (20,3), t=0 (20,10).
    # Full recall first at t=7; walking up, t=8 has recall 19/20 = 0.95 exactly -> FPR = 2/10.
    assert fpr_at_95_tpr(scores, is_known) == pytest.approx(0.2)
    assert brute_force_fpr95(scores, is_known) == pytest.approx(0.2)


def test_fpr95_tied_unknown_counts_at_threshold():
    known_scores = np.arange(20, 0, -1, dtype=float)  # 20 .. 1
    unknown_scores = np.array([25.0, 2.0, 0.5, 0.5])
    scores = np.r_[known_scores, unknown_scores]
    is_known = np.r_[np.ones(20, bool), np.zeros(4, bool)]
    # At t=2: 19 known accepted (recall 0.95) and the unknowns at 25 and 2 (tie) -> FPR = 2/4.
    assert fpr_at_95_tpr(scores, is_known) == pytest.approx(0.5)


def test_fpr95_nearest_recall_and_lowest_threshold_rule():
    scores = np.r_[np.arange(10, 0, -1, dtype=float), [5.5, 1.5, 1.0, 0.5]]
    is_known = np.r_[np.ones(10, bool), np.zeros(4, bool)]
    # Points near the bottom: t=2 (TP 9, FP 1), t=1.5 (9, 2), t=1 (10, 3: first full recall).
    # Recalls 0.9 and 1.0 are both ~0.05 from 0.95, but in float64 |0.9 - 0.95| is smaller, so
    # recall 0.9 wins over t=1 (FPR 3/4); walking up from t=1, t=1.5 is met before t=2 -> 2/4.
    assert abs(0.9 - 0.95) < abs(1.0 - 0.95)
    assert fpr_at_95_tpr(scores, is_known) == pytest.approx(0.5)
    assert brute_force_fpr95(scores, is_known) == pytest.approx(0.5)


def test_fpr95_is_not_an_interpolation():
    scores = np.r_[np.arange(10, 0, -1, dtype=float), [5.5, 1.0, 0.5, 0.5]]
    is_known = np.r_[np.ones(10, bool), np.zeros(4, bool)]
    # Recall 0.9 at t=2 (FP 1) beats recall 1.0 at t=1 (FP 2); interpolating the ROC curve
    # at 0.95 would land halfway between instead.
    assert fpr_at_95_tpr(scores, is_known) == pytest.approx(0.25)
    fpr, tpr, _ = roc_curve(is_known, scores)
    assert np.interp(0.95, tpr, fpr) == pytest.approx(0.375)


def test_fpr95_differs_from_sklearn_default_roc_curve_pick():
    scores, is_known = tie_example()
    fpr, tpr, _ = roc_curve(is_known, scores)  # drop_intermediate=True by default
    # The collinear points (18,1) and (19,2) are dropped, so the recall-0.95 point is gone.
    assert not np.any(np.isclose(tpr, 0.95))
    nearest_pick = fpr[np.argmin(np.abs(tpr - 0.95))]
    first_above_pick = fpr[np.argmax(tpr >= 0.95)]
    assert nearest_pick == pytest.approx(0.3)
    assert first_above_pick == pytest.approx(0.3)
    assert fpr_at_95_tpr(scores, is_known) == pytest.approx(0.2)
    # Without dropping, the point is there and the authors' pick is on the curve.
    fpr_all, tpr_all, _ = roc_curve(is_known, scores, drop_intermediate=False)
    assert np.any(np.isclose(tpr_all, 0.95) & np.isclose(fpr_all, 0.2))


@pytest.mark.parametrize("seed", range(30))
def test_fpr95_matches_brute_force_on_random_tied_scores(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    is_known = rng.random(n) < rng.uniform(0.2, 0.8)
    is_known[0], is_known[1] = True, False
    # Small integer range plus a class-dependent shift gives many ties and non-trivial curves.
    scores = rng.integers(0, 8, size=n).astype(float) + 2.0 * is_known
    assert fpr_at_95_tpr(scores, is_known) == pytest.approx(brute_force_fpr95(scores, is_known), abs=0)


def test_auroc_hand_example_with_tie():
    scores = np.array([3.0, 1.0, 2.0, 0.0, 1.0])
    is_known = np.array([True, True, False, False, False])
    # Known-vs-unknown pairs: 3>2, 3>0, 3>1, 1<2, 1>0, 1=1 (half) -> 4.5 / 6.
    assert auroc(scores, is_known) == pytest.approx(0.75)


def test_auroc_and_aupr_agree_with_sklearn():
    rng = np.random.default_rng(0)
    is_known = rng.random(200) < 0.4
    scores = rng.normal(size=200) + is_known
    assert auroc(scores, is_known) == pytest.approx(roc_auc_score(is_known, scores))
    assert aupr_in(scores, is_known) == pytest.approx(average_precision_score(is_known, scores))
    assert aupr_out(scores, is_known) == pytest.approx(average_precision_score(~is_known, -scores))
    assert aupr_in(scores, is_known) != pytest.approx(aupr_out(scores, is_known))


def test_perfect_and_reversed_separation():
    is_known = np.array([True] * 5 + [False] * 5)
    good = np.r_[np.linspace(5, 6, 5), np.linspace(0, 1, 5)]
    assert auroc(good, is_known) == 1.0
    assert fpr_at_95_tpr(good, is_known) == 0.0
    assert aupr_in(good, is_known) == 1.0
    assert aupr_out(good, is_known) == 1.0
    assert auroc(-good, is_known) == 0.0
    assert fpr_at_95_tpr(-good, is_known) == 1.0


def test_compute_metrics_keys_values_and_types():
    labels = np.array([0, 1, 2, 0, 3, 4, 3])  # known_classes=3 -> 4 known, 3 unknown
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.1, 0.2, 0.65])
    preds = np.array([0, 2, 2, 0, 1, 1, 0])
    out = compute_metrics(scores, labels, preds, known_classes=3)
    assert set(out) == {"auroc", "fpr95", "aupr_in", "aupr_out", "closed_set_acc", "n_known", "n_unknown"}
    assert out["n_known"] == 4 and out["n_unknown"] == 3
    assert out["closed_set_acc"] == pytest.approx(0.75)  # the known label-1 sample is wrong
    is_known = labels < 3
    assert out["auroc"] == pytest.approx(roc_auc_score(is_known, scores))
    # Full recall at t=0.6 accepts the unknown at 0.65 -> FPR 1/3; recall 0.75 at t=0.7 is farther.
    assert out["fpr95"] == pytest.approx(1 / 3)
    for key in ("auroc", "fpr95", "aupr_in", "aupr_out", "closed_set_acc"):
        assert type(out[key]) is float
    assert compute_metrics(scores, labels, None, known_classes=3)["closed_set_acc"] is None


def test_closed_set_accuracy_ignores_unknown_samples():
    labels = np.array([0, 1, 5, 6])
    preds = np.array([0, 0, 5, 6])
    assert closed_set_accuracy(preds, labels, known_classes=2) == pytest.approx(0.5)


def _raises_exactly(message):
    """pytest.raises(ValueError) whose message must be exactly `message`."""
    return pytest.raises(ValueError, match="^" + re.escape(message) + "$")


def test_errors_name_the_problem():
    scores = np.array([0.1, 0.2, 0.3])
    with _raises_exactly("no known (positive) samples among the 3 scored samples"):
        compute_metrics(scores, np.array([3, 4, 5]), None, known_classes=3)
    with _raises_exactly("no unknown (negative) samples among the 3 scored samples"):
        compute_metrics(scores, np.array([0, 1, 2]), None, known_classes=3)
    with _raises_exactly("scores contain 1 NaN value(s) (first at index 1)"):
        compute_metrics(np.array([0.1, np.nan, 0.3]), np.array([0, 1, 5]), None, known_classes=3)
    with _raises_exactly("length mismatch: scores shape (3,) vs labels shape (2,)"):
        compute_metrics(scores, np.array([0, 5]), None, known_classes=3)
    with _raises_exactly("length mismatch: preds shape (2,) vs labels shape (3,)"):
        compute_metrics(scores, np.array([0, 1, 5]), np.array([0, 1]), known_classes=3)
    with _raises_exactly("length mismatch: 3 scores but 2 is_known flags"):
        fpr_at_95_tpr(scores, np.array([True, False]))
    with _raises_exactly("no unknown (negative) samples among the 3 scored samples"):
        auroc(scores, np.ones(3, bool))
    with _raises_exactly("no known samples (label < 3) to compute closed-set accuracy on"):
        closed_set_accuracy(np.array([0, 1]), np.array([4, 5]), known_classes=3)


MIXED = np.array([True, False, True, False])


@pytest.mark.parametrize("scores, is_known, message", [
    (np.zeros((2, 2)), np.array([True, False]), "scores and is_known must be 1-D, got shapes (2, 2) and (2,)"),
    (np.zeros(2), np.array([[True, False]]), "scores and is_known must be 1-D, got shapes (2,) and (1, 2)"),
    (np.zeros(3), np.array([1, 0, 1]), "is_known must be a boolean array, got dtype int64"),
    # Two bad values each: the count and the first index are both in the message.
    (np.array([0.1, np.nan, 0.2, np.nan]), MIXED, "scores contain 2 NaN value(s) (first at index 1)"),
    (np.array([0.1, np.inf, 0.2, -np.inf]), MIXED, "scores contain 2 infinite value(s) (first at index 1)"),
])
@pytest.mark.parametrize("metric", [auroc, fpr_at_95_tpr, aupr_in, aupr_out])
def test_score_input_errors(metric, scores, is_known, message):
    with _raises_exactly(message):
        metric(scores, is_known)


@pytest.mark.parametrize("labels, known_classes, message", [
    (np.zeros((1, 2), int), 1, "labels must be 1-D, got shape (1, 2)"),
    (np.array([0.0, 1.0]), 1, "labels must be integers, got dtype float64"),
    (np.array([0, -3]), 1, "labels must be non-negative, got -3"),
    (np.array([0, 3]), 0, "known_classes must be a positive integer, got 0"),
    (np.array([0, 3]), -2, "known_classes must be a positive integer, got -2"),
    (np.array([0, 3]), True, "known_classes must be a positive integer, got True"),
    (np.array([0, 3]), 1.0, "known_classes must be a positive integer, got 1.0"),
    (np.array([0, 3]), "2", "known_classes must be a positive integer, got '2'"),
])
def test_label_errors(labels, known_classes, message):
    with _raises_exactly(message):
        closed_set_accuracy(np.zeros(2, int), labels, known_classes)
    with _raises_exactly(message):
        compute_metrics(np.array([0.5, 0.1]), labels, None, known_classes)


def test_one_known_class_is_valid():
    labels = np.array([0, 0, 1, 2])
    assert closed_set_accuracy(np.array([0, 1, 1, 1]), labels, known_classes=1) == 0.5
    assert closed_set_accuracy(np.array([0, 1, 1, 1]), labels, np.int64(2)) == pytest.approx(2 / 3)
    out = compute_metrics(np.array([0.9, 0.8, 0.1, 0.85]), labels, None, known_classes=1)
    assert (out["n_known"], out["n_unknown"]) == (2, 2) and out["auroc"] == 0.75


# ---------------------------------------------------------------- FPR95, interpolated (OODDetectionBench)

def brute_force_fpr95_interpolated(scores, is_known):
    """Loop version of the interpolated rule: the ROC polyline from (0, 0) through one point per distinct
    threshold ("known if score >= t"); the largest FPR where recall is exactly 0.95, else linear
    interpolation on the segment that crosses 0.95."""
    n_pos, n_neg = int(np.sum(is_known)), int(np.sum(~is_known))
    points = [(0.0, 0.0)]
    for t in sorted(set(scores.tolist()), reverse=True):
        accepted = scores >= t
        points.append((np.sum(accepted & is_known) / n_pos, np.sum(accepted & ~is_known) / n_neg))
    exact = [fpr for recall, fpr in points if recall == 0.95]
    if exact:
        return max(exact)
    for (r0, f0), (r1, f1) in itertools.pairwise(points):
        if r0 < 0.95 < r1:
            return f0 + (f1 - f0) * (0.95 - r0) / (r1 - r0)
    raise AssertionError("no segment crosses recall 0.95")


def test_fpr95_interpolated_hand_examples():
    # Recall 0.95 is met exactly at t = 2 (19 of 20 known; unknowns at 25 and 2) -> FPR 2/4.
    scores = np.r_[np.arange(20, 0, -1, dtype=float), [25.0, 2.0, 0.5, 0.5]]
    is_known = np.r_[np.ones(20, bool), np.zeros(4, bool)]
    assert fpr_at_95_tpr_interpolated(scores, is_known) == pytest.approx(0.5)
    # Recall 0.9 at t = 1.5 (FP 2), 1.0 at t = 1 (FP 3): halfway -> FPR 2.5/4 (the authors' rule gives 2/4).
    scores = np.r_[np.arange(10, 0, -1, dtype=float), [5.5, 1.5, 1.0, 0.5]]
    is_known = np.r_[np.ones(10, bool), np.zeros(4, bool)]
    assert fpr_at_95_tpr_interpolated(scores, is_known) == pytest.approx(0.625)
    assert fpr_at_95_tpr(scores, is_known) == pytest.approx(0.5)
    # Recall 0.95 on a horizontal run (t = 9: FP 1, t = 8.5: FP 2, both 19 of 20 known): the right end.
    scores = np.r_[np.full(18, 10.0), [9.0, 1.0], [9.5, 8.5, 0.0]]
    is_known = np.r_[np.ones(20, bool), np.zeros(3, bool)]
    assert fpr_at_95_tpr_interpolated(scores, is_known) == pytest.approx(2 / 3)
    assert fpr_at_95_tpr_interpolated(-np.arange(4.0), np.array([True, True, False, False])) == 0.0


@pytest.mark.parametrize("seed", range(30))
def test_fpr95_interpolated_matches_brute_force_on_random_tied_scores(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    is_known = rng.random(n) < rng.uniform(0.2, 0.8)
    is_known[0], is_known[1] = True, False
    scores = rng.integers(0, 8, size=n).astype(float) + 2.0 * is_known
    expected = brute_force_fpr95_interpolated(scores, is_known)
    assert fpr_at_95_tpr_interpolated(scores, is_known) == pytest.approx(expected, abs=1e-12)


def test_fpr95_interpolated_checks_its_inputs():
    with _raises_exactly("no unknown (negative) samples among the 3 scored samples"):
        fpr_at_95_tpr_interpolated(np.array([0.1, 0.2, 0.3]), np.ones(3, bool))
    with _raises_exactly("scores contain 1 NaN value(s) (first at index 0)"):
        fpr_at_95_tpr_interpolated(np.array([np.nan, 0.2]), np.array([True, False]))
