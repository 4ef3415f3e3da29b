"""Novelty-detection metrics: known samples (label < known_classes) are the positive class."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

RECALL_LEVEL = 0.95


def _check_inputs(scores: np.ndarray, is_known: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate a (scores, is_known) pair and return them as 1-D float64 / bool arrays."""
    scores = np.asarray(scores)
    is_known = np.asarray(is_known)
    if scores.ndim != 1 or is_known.ndim != 1:
        raise ValueError(f"scores and is_known must be 1-D, got shapes {scores.shape} and {is_known.shape}")
    if scores.shape[0] != is_known.shape[0]:
        raise ValueError(f"length mismatch: {scores.shape[0]} scores but {is_known.shape[0]} is_known flags")
    if is_known.dtype != np.bool_:
        raise ValueError(f"is_known must be a boolean array, got dtype {is_known.dtype}")
    scores = scores.astype(np.float64)
    n_nan = int(np.isnan(scores).sum())
    if n_nan:
        raise ValueError(f"scores contain {n_nan} NaN value(s) (first at index {int(np.flatnonzero(np.isnan(scores))[0])})")
    n_inf = int(np.isinf(scores).sum())
    if n_inf:
        raise ValueError(f"scores contain {n_inf} infinite value(s) (first at index {int(np.flatnonzero(np.isinf(scores))[0])})")
    if not is_known.any():
        raise ValueError(f"no known (positive) samples among the {is_known.shape[0]} scored samples")
    if is_known.all():
        raise ValueError(f"no unknown (negative) samples among the {is_known.shape[0]} scored samples")
    return scores, is_known


def auroc(scores: np.ndarray, is_known: np.ndarray) -> float:
    """Area under the ROC curve with known samples as positives (higher score = more normal)."""
    scores, is_known = _check_inputs(scores, is_known)
    return float(roc_auc_score(is_known, scores))


def fpr_at_95_tpr(scores: np.ndarray, is_known: np.ndarray) -> float:
    """False positive rate at the operating point whose recall is nearest 95%, the authors' way."""
    scores, is_known = _check_inputs(scores, is_known)
    # The order within a run of equal scores does not matter: only the run ends are read.
    order = np.argsort(scores)[::-1]
    sorted_scores = scores[order]
    sorted_known = is_known[order]
    # One operating point per distinct score: the last position of each run of equal scores,
    # so ties are always accepted or rejected together ("known if score >= t").
    run_ends = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
    tps = np.cumsum(sorted_known)[run_ends]
    fps = run_ends + 1 - tps
    n_pos = tps[-1]
    n_neg = sorted_scores.size - n_pos
    recall = tps / n_pos
    first_full = int(np.searchsorted(tps, n_pos))
    # Walking from the full-recall threshold back up makes argmin's first-occurrence rule
    # prefer the lowest threshold among equally near recalls, as the authors' slice does.
    walk = slice(first_full, None, -1)
    pick = int(np.argmin(np.abs(recall[walk] - RECALL_LEVEL)))
    return float(fps[walk][pick] / n_neg)


def aupr_in(scores: np.ndarray, is_known: np.ndarray) -> float:
    """Average precision with known samples as positives, ranked by score."""
    scores, is_known = _check_inputs(scores, is_known)
    return float(average_precision_score(is_known, scores))


def aupr_out(scores: np.ndarray, is_known: np.ndarray) -> float:
    """Average precision with unknown samples as positives, ranked by the negated score."""
    scores, is_known = _check_inputs(scores, is_known)
    return float(average_precision_score(~is_known, -scores))


def _check_labels(labels: np.ndarray, known_classes: int) -> np.ndarray:
    """Validate integer class labels and the number of known classes."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if isinstance(known_classes, bool) or not isinstance(known_classes, (int, np.integer)) or known_classes < 1:
        raise ValueError(f"known_classes must be a positive integer, got {known_classes!r}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"labels must be non-negative, got {int(labels.min())}")
    return labels


def closed_set_accuracy(preds: np.ndarray, labels: np.ndarray, known_classes: int) -> float:
    """Fraction of known samples whose predicted class equals their label."""
    labels = _check_labels(labels, known_classes)
    preds = np.asarray(preds)
    if preds.shape != labels.shape:
        raise ValueError(f"length mismatch: preds shape {preds.shape} vs labels shape {labels.shape}")
    known = labels < known_classes
    if not known.any():
        raise ValueError(f"no known samples (label < {known_classes}) to compute closed-set accuracy on")
    return float(np.mean(preds[known] == labels[known]))


def compute_metrics(
    scores: np.ndarray, labels: np.ndarray, preds: np.ndarray | None, known_classes: int
) -> dict[str, float | int | None]:
    """All novelty metrics plus closed-set accuracy (None without predictions) and the class counts."""
    labels = _check_labels(labels, known_classes)
    scores = np.asarray(scores)
    if scores.shape != labels.shape:
        raise ValueError(f"length mismatch: scores shape {scores.shape} vs labels shape {labels.shape}")
    is_known = labels < known_classes
    scores, is_known = _check_inputs(scores, is_known)
    return {
        "auroc": auroc(scores, is_known),
        "fpr95": fpr_at_95_tpr(scores, is_known),
        "aupr_in": aupr_in(scores, is_known),
        "aupr_out": aupr_out(scores, is_known),
        "closed_set_acc": None if preds is None else closed_set_accuracy(preds, labels, known_classes),
        "n_known": int(is_known.sum()),
        "n_unknown": int((~is_known).sum()),
    }


def fpr_at_95_tpr_interpolated(scores: np.ndarray, is_known: np.ndarray) -> float:
    """False positive rate at recall 0.95 read off the ROC curve by linear interpolation.

    The convention of OODDetectionBench (`ood_metrics.fpr_at_95_tpr`): the ROC curve is the polyline
    through (0, 0) and one operating point per distinct score ("known if score >= t", ties accepted
    together); where recall 0.95 falls inside a segment, the FPR is interpolated linearly along it;
    where the curve meets recall 0.95 exactly, the largest FPR with that recall is taken (the right
    end of a horizontal run). Unlike `fpr_at_95_tpr` (the ReSeND authors' nearest-recall rule) the
    result need not be a multiple of 1 / n_unknown.
    """
    scores, is_known = _check_inputs(scores, is_known)
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    true_positives = np.cumsum(is_known[order])
    run_ends = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
    tps = true_positives[run_ends]
    fps = run_ends + 1 - tps
    n_pos, n_neg = tps[-1], sorted_scores.size - tps[-1]
    tpr = np.r_[0.0, tps / n_pos]
    fpr = np.r_[0.0, fps / n_neg]
    # tpr[0] = 0 < 0.95 <= tpr[-1] = 1: `last_below` is a point before the last.
    last_below = int(np.flatnonzero(tpr < RECALL_LEVEL)[-1])
    at_level = np.flatnonzero(tpr == RECALL_LEVEL)
    if at_level.size:
        return float(fpr[at_level[-1]])
    low, high = last_below, last_below + 1
    slope = (fpr[high] - fpr[low]) / (tpr[high] - tpr[low])
    return float(fpr[low] + slope * (RECALL_LEVEL - tpr[low]))
