"""Tests for evaluation.metrics: hand-computed FPR95 (authors' rule), sklearn agreement, errors."""
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


def test_errors_name_the_problem():
    scores = np.array([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="no known"):
        compute_metrics(scores, np.array([3, 4, 5]), None, known_classes=3)
    with pytest.raises(ValueError, match="no unknown"):
        compute_metrics(scores, np.array([0, 1, 2]), None, known_classes=3)
    with pytest.raises(ValueError, match="NaN"):
        compute_metrics(np.array([0.1, np.nan, 0.3]), np.array([0, 1, 5]), None, known_classes=3)
    with pytest.raises(ValueError, match="length mismatch"):
        compute_metrics(scores, np.array([0, 5]), None, known_classes=3)
    with pytest.raises(ValueError, match="length mismatch"):
        compute_metrics(scores, np.array([0, 1, 5]), np.array([0, 1]), known_classes=3)
    with pytest.raises(ValueError, match="length mismatch"):
        fpr_at_95_tpr(scores, np.array([True, False]))
    with pytest.raises(ValueError, match="no unknown"):
        auroc(scores, np.ones(3, bool))
    with pytest.raises(ValueError, match="no known"):
        closed_set_accuracy(np.array([0, 1]), np.array([4, 5]), known_classes=3)
