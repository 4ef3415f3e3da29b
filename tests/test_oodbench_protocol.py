"""`--baseline_protocol oodbench`: the post-hoc baselines as OODDetectionBench (FrancescoCappio/OODDetectionBench,
models/evaluators/) computes them, checked against its formulas written out here in numpy/scipy (not its code),
on small fixed feature sets with ties and duplicates; and the interpolated FPR95 of its `ood_metrics`.

The harness's formulas, as read from its evaluators:
- prototypes: p_c = mean of class c; normality = 1 - min_c ||x - p_c||; pred = argmin.
- cosine prototypes (contrastive heads give unit vectors): p_c = normalise(mean of the unit vectors of class c);
  normality = max_c <x / ||x||, p_c>; pred = argmax.
- kNN (faiss IndexFlatL2: squared distances): normality = -(squared distance to the K-th nearest support
  feature), on L2-normalised features (knn_ood) or raw ones (knn_distance); pred = the most frequent label
  among the K nearest (np.bincount(...).argmax(): ties to the smallest label).
- Mahalanobis (Lee et al. 2018, without the input step): class means; EmpiricalCovariance(assume_centered=False)
  of the class-centred features (re-centred, 1/N); P = scipy.linalg.pinvh(cov);
  normality = max_c -0.5 (x - mu_c)' P (x - mu_c).
- linear probe: LogisticRegression(liblinear, C = 0.316) one-vs-rest: for each class, the L2-regularised
  logistic regression 0.5 |w|^2 + C sum log(1 + exp(-y w'[x, 1])) (liblinear penalises the intercept);
  normality = max_c sigmoid_c / sum_c' sigmoid_c'; two classes: one problem, (1 - p, p).
- FPR95 (ood_metrics.fpr_at_95_tpr): np.interp(0.95, tpr, fpr) on sklearn's roc_curve.
"""
import types

import numpy as np
import pytest
import scipy.linalg
import scipy.optimize
import torch
from sklearn.metrics import roc_curve

import train
from evaluation.evaluate import _result
from evaluation.metrics import auroc, fpr_at_95_tpr, fpr_at_95_tpr_interpolated
from evaluation.scorers import FeatureBatch, ScoringInputs, build_scorer
from evaluation.scorers.distance import MahalanobisScorer, oodbench_input_step

OODBENCH = {"baseline_protocol": "oodbench"}

# Class sizes 2 and 4 (means are exact binary fractions) and small integers: every distance below is computed
# exactly in float64, so that ties in exact arithmetic stay ties in both implementations.
SUPPORT = np.array([
    [4, 0, 0, 1, 0], [2, 0, 2, 1, 0], [4, 0, 0, 1, 0], [2, 2, 0, 1, 0],      # class 0 (one duplicate)
    [0, 4, 0, 0, 1], [0, 2, 2, 0, 1],                                        # class 1
    [0, 0, 4, 2, 0], [0, 0, 2, 2, 2], [1, 0, 3, 2, 1], [0, 0, 4, 2, 0],      # class 2 (one duplicate)
], dtype=np.float64)
SUPPORT_LABELS = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
SCORED = np.array([
    [4, 0, 0, 1, 0],   # a support feature again
    [4, 0, 0, 1, 0],   # ... twice: tied
    [3, 1, 0, 1, 0],
    [0, 3, 1, 0, 1],
    [0, 3, 1, 0, 1],   # duplicate of the previous one
    [0, 0, 3, 2, 1],
    [1, 1, 3, 2, 0],
    [2, 2, 2, 1, 1],   # between the classes
    [1, 1, 1, 1, 1],
    [0, 0, 0, 0, 4],
    [4, 4, 0, 0, 0],
    [2, 2, 2, 1, 1],   # duplicate unknown
    [0, 1, 0, 3, 3],
], dtype=np.float64)
IS_KNOWN = np.array([1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0], dtype=bool)
SCORED_LABELS = np.array([0, 0, 0, 1, 1, 2, 2])


def run(name, support=SUPPORT, labels=SUPPORT_LABELS, scored=SCORED, **options):
    """(normality, pred) of a registered scorer fitted on `support` and scoring `scored` (float32 inputs)."""
    scorer = build_scorer(name, {**OODBENCH, **options})
    scorer.fit(ScoringInputs(FeatureBatch(torch.tensor(support, dtype=torch.float32), torch.tensor(labels))))
    result = scorer.score(FeatureBatch(torch.tensor(scored, dtype=torch.float32)))
    return result.normality.numpy().astype(np.float64), None if result.pred is None else result.pred.numpy()


def class_means_np(support, labels):
    return np.stack([support[labels == c].mean(axis=0) for c in np.unique(labels)])


def unit(rows):
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def assert_same_auroc(ours, expected, is_known=IS_KNOWN):
    assert abs(auroc(ours, is_known) - auroc(expected, is_known)) <= 1e-4


# ------------------------------------------------------------------------------------- the harness's formulas

def harness_prototypes(support, labels, scored):
    means = class_means_np(support, labels)
    dist = np.stack([[np.sqrt(np.sum((x - m) ** 2)) for m in means] for x in scored])
    return 1.0 - dist.min(axis=1), dist.argmin(axis=1)


def harness_cosine(support, labels, scored):
    prototypes = unit(class_means_np(unit(support), labels))
    sims = unit(scored) @ prototypes.T
    return sims.max(axis=1), sims.argmax(axis=1)


def harness_knn(support, labels, scored, k, normalise):
    if normalise:
        support, scored = unit(support), unit(scored)
    normality, pred = [], []
    for x in scored:
        squared = np.array([np.sum((x - s) ** 2) for s in support])
        nearest = np.argsort(squared, kind="stable")[:k]  # equal distances: support order
        normality.append(-squared[nearest[-1]])
        pred.append(np.bincount(labels[nearest]).argmax())
    return np.array(normality), np.array(pred)


def harness_mahalanobis(support, labels, scored):
    means = class_means_np(support, labels)
    centred = support - means[labels]
    centred = centred - centred.mean(axis=0)
    precision = scipy.linalg.pinvh(centred.T @ centred / len(centred))
    gauss = np.stack([[-0.5 * (x - m) @ precision @ (x - m) for m in means] for x in scored])
    return gauss.max(axis=1), gauss.argmax(axis=1)


def l2_logistic(x, y, c):
    """argmin_w 0.5 |w|^2 + c sum log(1 + exp(-y w'[x, 1])), y in {-1, +1}: liblinear's primal with its bias."""
    design = np.hstack([x, np.ones((len(x), 1))])

    def objective(w):
        margins = y * (design @ w)
        loss = 0.5 * w @ w + c * np.sum(np.logaddexp(0.0, -margins))
        grad = w - c * design.T @ (y * scipy.special.expit(-margins))
        return loss, grad

    solution = scipy.optimize.minimize(objective, np.zeros(design.shape[1]), jac=True, method="L-BFGS-B",
                                       options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 10000})
    return solution.x


def harness_probe(support, labels, scored, c=0.316):
    classes = np.unique(labels)
    design = np.hstack([scored, np.ones((len(scored), 1))])
    if len(classes) == 2:
        p = scipy.special.expit(design @ l2_logistic(support, np.where(labels == classes[1], 1.0, -1.0), c))
        proba = np.stack([1 - p, p], axis=1)
    else:
        sig = np.stack([scipy.special.expit(design @ l2_logistic(support, np.where(labels == k, 1.0, -1.0), c))
                        for k in classes], axis=1)
        proba = sig / sig.sum(axis=1, keepdims=True)
    return proba.max(axis=1), proba.argmax(axis=1)


# ---------------------------------------------------------------------------------------------------- tests

def test_prototype_distance_is_one_minus_the_nearest_mean_distance():
    ours, pred = run("prototype_distance")
    expected, expected_pred = harness_prototypes(SUPPORT, SUPPORT_LABELS, SCORED)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-12)
    assert np.array_equal(pred, expected_pred)
    assert_same_auroc(ours, expected)
    assert ours[0] == ours[1] and ours[7] == ours[11]  # duplicates tie


def test_cosine_prototypes_average_unit_vectors():
    ours, pred = run("prototype_cosine")
    expected, expected_pred = harness_cosine(SUPPORT, SUPPORT_LABELS, SCORED)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-12)
    assert np.array_equal(pred, expected_pred)
    assert_same_auroc(ours, expected)
    # The default protocol averages raw features: a different prototype, a different number.
    this, _ = run("prototype_cosine", baseline_protocol="this")
    assert not np.allclose(this, ours)


@pytest.mark.parametrize("k", [1, 3, 4])
@pytest.mark.parametrize("normalise", [True, False], ids=["knn_ood", "knn_distance"])
def test_knn_kth_squared_distance_and_majority_vote(k, normalise):
    ours, pred = run("knn", NNK=k, knn_normalize=normalise)
    expected, expected_pred = harness_knn(SUPPORT, SUPPORT_LABELS, SCORED, k, normalise)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-12)
    assert np.array_equal(pred, expected_pred)
    assert_same_auroc(ours, expected)


def test_knn_vote_ties_go_to_the_smallest_label():
    # Three neighbours, one of each class: bincount's argmax, the smallest label (here 0).
    support = np.array([[1.0, 0], [0, 2.0], [-3.0, 0], [0, -4.0]])
    labels = np.array([2, 1, 0, 0])
    _, pred = run("knn", support=support, labels=labels, scored=np.zeros((1, 2)), NNK=3, knn_normalize=False)
    assert pred.tolist() == [0]
    _, pred = run("knn", support=support, labels=labels, scored=np.zeros((1, 2)), NNK=1, knn_normalize=False)
    assert pred.tolist() == [2]


def test_knn_raw_features_need_the_oodbench_protocol():
    with pytest.raises(ValueError, match="baseline_protocol oodbench"):
        build_scorer("knn", {"knn_normalize": False})


def test_mahalanobis_empirical_covariance_pseudo_inverse():
    ours, pred = run("mahalanobis")
    expected, expected_pred = harness_mahalanobis(SUPPORT, SUPPORT_LABELS, SCORED)
    np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=1e-9)
    assert np.array_equal(pred, expected_pred)
    assert_same_auroc(ours, expected)


def test_mahalanobis_pseudo_inverse_ignores_dead_dimensions():
    # Two dimensions never vary in the support (dead units): the covariance is singular and pinvh drops them,
    # so scored features that differ only there score alike.
    support = np.hstack([SUPPORT, np.zeros((len(SUPPORT), 2))])
    scored = np.hstack([SCORED, np.zeros((len(SCORED), 2))])
    scored[3, 5:] = [5.0, -3.0]
    ours, pred = run("mahalanobis", support=support, scored=scored)
    expected, expected_pred = harness_mahalanobis(support, SUPPORT_LABELS, scored)
    np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=1e-9)
    assert np.array_equal(pred, expected_pred)
    assert ours[3] == pytest.approx(ours[4], abs=1e-9)
    assert_same_auroc(ours, expected)


def test_mahalanobis_oodbench_refuses_a_support_without_spread():
    with pytest.raises(ValueError, match="do not vary"):
        run("mahalanobis", support=SUPPORT[[0, 4, 6]], labels=np.array([0, 1, 2]))


@pytest.mark.parametrize("n_classes", [2, 3])
def test_linear_probe_one_vs_rest_liblinear(n_classes):
    keep = SUPPORT_LABELS < n_classes
    support, labels = SUPPORT[keep], SUPPORT_LABELS[keep]
    ours, pred = run("linear_probe", support=support, labels=labels)
    expected, expected_pred = harness_probe(support, labels, SCORED)
    # liblinear stops at its tolerance: probabilities agree to ~1e-4, rankings exactly.
    np.testing.assert_allclose(ours, expected, rtol=0, atol=2e-3)
    assert np.array_equal(pred, expected_pred)
    assert_same_auroc(ours, expected)
    assert ours[0] == ours[1] and ours[3] == ours[4]


def test_default_protocol_is_this_projects():
    for name in ("prototype_distance", "prototype_cosine", "knn", "mahalanobis", "linear_probe"):
        assert build_scorer(name).baseline_protocol == "this"
    this, _ = run("prototype_distance", baseline_protocol="this")
    expected, _ = harness_prototypes(SUPPORT, SUPPORT_LABELS, SCORED)
    np.testing.assert_allclose(this, expected - 1.0, atol=1e-5)  # minus the distance, float32
    with pytest.raises(ValueError, match="baseline_protocol"):
        build_scorer("knn", {"baseline_protocol": "harness"})


def test_protocol_flag_on_the_command_line():
    parser = train.get_args_parser()
    assert parser.parse_args([]).baseline_protocol == "this"
    assert parser.parse_args(["--baseline_protocol", "oodbench"]).baseline_protocol == "oodbench"
    assert parser.parse_args(["--knn_normalize", "off"]).knn_normalize is False
    with pytest.raises(SystemExit):
        parser.parse_args(["--baseline_protocol", "paper"])


# ------------------------------------------------------------------------------------------ FPR95, interpolated

def ood_metrics_fpr95(scores, is_known):
    """ood_metrics.fpr_at_95_tpr written out: linear interpolation of the ROC curve at TPR 0.95."""
    fpr, tpr, _ = roc_curve(is_known, scores)
    return float(np.interp(0.95, tpr, fpr))


def test_interpolated_fpr95_matches_ood_metrics_on_ties():
    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(5, 60))
        scores = rng.integers(0, 6, n).astype(float) if trial % 2 else rng.normal(size=n)
        is_known = rng.random(n) < 0.6
        if is_known.all() or not is_known.any():
            continue
        assert fpr_at_95_tpr_interpolated(scores, is_known) == pytest.approx(ood_metrics_fpr95(scores, is_known),
                                                                             abs=1e-12)


def test_interpolated_fpr95_hand_examples():
    # 19 of 20 known above every unknown, the 20th below 4 of the 19 unknowns: the ROC runs flat at recall
    # exactly 0.95 from FPR 0 to 4/19, and np.interp on such a run returns its right end: 4/19, not 0.
    scores = np.r_[np.arange(40, 21, -1), np.array([21, 20, 19, 18]), np.array([17.5]), np.arange(17, 2, -1)]
    is_known = np.r_[np.ones(19, bool), np.zeros(4, bool), np.ones(1, bool), np.zeros(15, bool)]
    assert fpr_at_95_tpr_interpolated(scores, is_known) == pytest.approx(4 / 19)
    assert ood_metrics_fpr95(scores, is_known) == pytest.approx(4 / 19)
    # Ten known, ten unknown; the 10th known ties with the 5th unknown: the ROC jumps from (FPR 0.4, recall 0.9)
    # to (0.5, 1.0) in one step, and recall 0.95 lies halfway: 0.45. The nearest-recall rule takes one of the
    # two points (in float64, 0.95 - 0.9 < 1.0 - 0.95: the first).
    is_known = np.array([1, 0, 1, 0, 1, 0, 1, 0, 1, 1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0], bool)
    scores = np.arange(20, 0, -1).astype(float)
    scores[14] = scores[13]
    assert fpr_at_95_tpr_interpolated(scores, is_known) == pytest.approx(0.45)
    assert ood_metrics_fpr95(scores, is_known) == pytest.approx(0.45)
    assert fpr_at_95_tpr(scores, is_known) == pytest.approx(0.4)


def test_engine_adds_the_interpolated_column_only_for_oodbench():
    split = types.SimpleNamespace(dataset="D", target="T", known_classes=2, scored=[("a", 0)] * 6)
    labels = np.array([0, 1, 0, 2, 1, 3])
    result = types.SimpleNamespace(normality=torch.tensor([0.9, 0.8, 0.1, 0.2, 0.7, 0.3]),
                                   pred=None, extra={}, maps=None)
    plain = _result(split, "knn", result, labels, 4, {})
    assert "fpr95_interp" not in plain.metrics
    record = _result(split, "knn", result, labels, 4, {}, interpolated_fpr=True)
    assert record.metrics["fpr95_interp"] == pytest.approx(ood_metrics_fpr95(result.normality.numpy(), labels < 2))


# ------------------------------------------------------------------------------------------ the input step

def test_input_step_moves_every_image_towards_its_nearest_class():
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                   torch.nn.Flatten()).double()
    images = torch.randn(12, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        feats = backbone(images)
    labels = torch.arange(3).repeat(4)
    scorer = MahalanobisScorer(baseline_protocol="oodbench")
    scorer.fit(ScoringInputs(FeatureBatch(feats, labels)))
    moved = oodbench_input_step(backbone, images, scorer, epsilon=1e-4)
    before = scorer.gaussian_scores(feats).max(dim=1).values
    after = scorer.gaussian_scores(moved).max(dim=1).values
    # A small step against the gradient's sign raises each image's best Gaussian score.
    assert bool((after > before).all())
    # The step: -epsilon * sign(gradient) / std, a zero gradient counting as positive.
    images.requires_grad_(True)
    whitened = backbone(images) @ scorer.whitening
    nearest = torch.cdist(whitened, scorer.whitened_prototypes).argmin(dim=1)
    (0.5 * (whitened - scorer.whitened_prototypes[nearest]).pow(2).sum(dim=1)).mean().backward()
    step = torch.where(images.grad >= 0, 1.0, -1.0) / torch.tensor([0.2023, 0.1994, 0.2010]).view(1, 3, 1, 1)
    with torch.no_grad():
        np.testing.assert_allclose(moved.numpy(), backbone(images - 1e-4 * step).numpy(), atol=1e-12)
    with pytest.raises(ValueError, match="oodbench"):
        oodbench_input_step(backbone, images.detach(), MahalanobisScorer())
