"""Focused checks of the post-hoc baselines and neighbouring scorers (evaluation/scorers/distance.py, probe.py,
classifier.py, maps.py, density.py, latent.py) that mutation testing round 3 showed missing (tests/MUTATION.md):
exact messages and boundaries, dtypes, empty inputs, block sizes, and values written out with plain numpy/torch.
Small inputs only: these run once per mutant."""
import argparse
import math
import warnings

import numpy as np
import pytest
import torch

from evaluation.scorers import FeatureBatch, FitCache, ScoringInputs, build_scorer
from evaluation.scorers import classifier, distance, maps
from evaluation.scorers.classifier import ash_b, check_percent, fit_linear_head, percent
from evaluation.scorers.distance import (
    KnnDistanceScorer,
    MahalanobisScorer,
    PrototypeCosineScorer,
    PrototypeDistanceScorer,
    check_protocol,
    empirical_covariance,
    exact_distances,
    ledoit_wolf_covariance,
    oodbench_input_step,
    protocol_choice,
    pseudo_inverse_whitening,
)
from evaluation.scorers.maps import PrototypeMapScorer, novelty_maps, reduction_choice
from evaluation.scorers.probe import LinearProbeScorer

EPS64 = float(np.finfo(np.float64).eps)


def fitted(scorer, feats, labels):
    scorer.fit(ScoringInputs(FeatureBatch(feats, labels)))
    return scorer


def two_blobs(dtype=torch.float64, dim=3):
    """Two classes of four rows each, integer-valued (exact in any float type)."""
    feats = torch.tensor([[4, 1, 0], [5, 0, 1], [4, 0, 0], [6, 1, 1],
                          [0, 4, 1], [1, 5, 0], [0, 6, 2], [1, 4, 1]], dtype=dtype)[:, :dim]
    return feats, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])


# ------------------------------------------------------------------------------------------------ protocols

def test_protocol_messages_list_the_valid_values():
    assert protocol_choice("this") == "this" and protocol_choice("oodbench") == "oodbench"
    with pytest.raises(argparse.ArgumentTypeError) as error:
        protocol_choice("paper")
    assert str(error.value) == "must be one of this, oodbench, got 'paper'"
    assert check_protocol("oodbench") == "oodbench"
    with pytest.raises(ValueError) as error:
        check_protocol("harness")
    assert str(error.value) == "baseline_protocol must be one of this, oodbench, got 'harness'"


# --------------------------------------------------------------------------------------- distances and means

def test_exact_distances_are_float64_explicit_differences():
    # 30 x 30 rows (cdist's matmul shortcut would be used above 25) far from the origin, each target within 1e-3
    # of a reference: the shortcut |x|^2 + |y|^2 - 2 x.y loses such differences, explicit ones keep them.
    rng = np.random.default_rng(0)
    references = 1e7 + 1e3 * rng.normal(size=(30, 3))
    targets = references[rng.permutation(30)] + 1e-3 * rng.normal(size=(30, 3))
    expected = np.sqrt(((targets[:, None, :] - references[None, :, :]) ** 2).sum(axis=2))
    ours = exact_distances(torch.tensor(targets), torch.tensor(references))
    assert ours.dtype == torch.float64
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-9)
    # float32 inputs (either or both) are compared in float64.
    t32, r32 = np.float32(targets).astype(np.float64), np.float32(references).astype(np.float64)
    for t_dtype, r_dtype, t, r in ((torch.float32, torch.float32, t32, r32),
                                   (torch.float64, torch.float32, targets, r32)):
        ours = exact_distances(torch.tensor(targets, dtype=t_dtype), torch.tensor(references, dtype=r_dtype))
        assert ours.dtype == torch.float64
        np.testing.assert_allclose(ours.numpy(), np.sqrt(((t[:, None, :] - r[None, :, :]) ** 2).sum(axis=2)),
                                   rtol=1e-9)


def test_prototype_distance_means_in_float64_for_oodbench_and_in_the_features_dtype_otherwise():
    # Class 0's mean (1 + 1 + 2) / 3 = 4/3 is not a float32 number: oodbench averages in float64.
    support = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, 5.0], [0.0, 7.0]])
    labels = torch.tensor([0, 0, 0, 1, 1])
    scored = torch.tensor([[0.0, 0.0], [0.0, 9.0]])
    oodbench = fitted(PrototypeDistanceScorer(baseline_protocol="oodbench"), support, labels)
    result = oodbench.score(FeatureBatch(scored))
    assert oodbench.prototypes.dtype == torch.float64 and result.normality.dtype == torch.float64
    np.testing.assert_array_equal(result.normality.numpy(), [1.0 - 4.0 / 3.0, 1.0 - 3.0])
    assert result.pred.tolist() == [0, 1]
    this = fitted(PrototypeDistanceScorer(), support, labels)
    result = this.score(FeatureBatch(scored.double()))  # float64 scored features follow the float32 prototypes
    assert this.prototypes.dtype == torch.float32 and result.normality.dtype == torch.float32
    np.testing.assert_array_equal(result.normality.numpy(), np.float32([-np.float32(4.0) / np.float32(3.0), -3.0]))


def test_cosine_prototypes_normalise_each_row():
    # Rows of different lengths: normalising over the wrong dimension changes both prototypes and scores.
    support = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    scored = torch.tensor([[2.0, 0.0], [0.0, 5.0], [3.0, 3.0]], dtype=torch.float64)

    def unit(rows):
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    s, x = support.numpy(), scored.numpy()
    for protocol, means in (("this", np.stack([s[:2].mean(0), s[2:].mean(0)])),
                            ("oodbench", np.stack([unit(s[:2]).mean(0), unit(s[2:]).mean(0)]))):
        scorer = fitted(PrototypeCosineScorer(baseline_protocol=protocol), support, labels)
        cosine = unit(x) @ unit(means).T
        result = scorer.score(FeatureBatch(scored))
        np.testing.assert_allclose(result.normality.numpy(), cosine.max(axis=1), rtol=0, atol=1e-15)
        assert result.pred.tolist() == cosine.argmax(axis=1).tolist()


# -------------------------------------------------------------------------------------------------------- kNN

def knn_expected(support, scored, k):
    """-sqrt(2 - 2 cos) to the k-th most similar unit support vector, and the label index of the most similar."""
    unit_s = support / np.linalg.norm(support, axis=1, keepdims=True)
    unit_x = scored / np.linalg.norm(scored, axis=1, keepdims=True)
    cosine = unit_x @ unit_s.T
    kth = -np.sort(-cosine, axis=1)[:, k - 1]
    return -np.sqrt(np.maximum(2 - 2 * kth, 0)), cosine.argmax(axis=1)


KNN_SUPPORT = torch.tensor([[1.0, 0.0, 0.0], [3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 1.0, 5.0]], dtype=torch.float64)
KNN_LABELS = torch.tensor([1, 0, 2, 0])
KNN_SCORED = torch.tensor([[2.0, 0.1, 0.0], [0.0, 1.0, 3.0], [5.0, 5.0, 0.5], [0.2, 4.0, 0.0], [1.0, 2.0, 3.0]],
                          dtype=torch.float64)


@pytest.mark.parametrize("block, rows", [(None, 5), (12, 3), (8, 2), (3, 1), (1, 1)])
def test_knn_scores_in_blocks_of_at_most_the_bound(monkeypatch, block, rows):
    # KNN_BLOCK_ELEMENTS bounds the [rows, support] block (at least one row); the result does not depend on it.
    if block is not None:
        monkeypatch.setattr(distance, "KNN_BLOCK_ELEMENTS", block)
    shapes = []
    topk = torch.topk

    def recording_topk(values, *args, **kwargs):
        shapes.append(tuple(values.shape))
        return topk(values, *args, **kwargs)

    monkeypatch.setattr(torch, "topk", recording_topk)
    scorer = fitted(KnnDistanceScorer(k=2), KNN_SUPPORT, KNN_LABELS)
    result = scorer.score(FeatureBatch(KNN_SCORED))
    expected, nearest = knn_expected(KNN_SUPPORT.numpy(), KNN_SCORED.numpy(), 2)
    np.testing.assert_allclose(result.normality.numpy(), expected, rtol=0, atol=1e-12)
    assert result.pred.tolist() == KNN_LABELS[nearest].tolist()
    assert shapes == [(min(rows, 5 - start), 4) for start in range(0, 5, rows)]
    # float32 scored features against the float64 support: compared in the support's dtype.
    np.testing.assert_allclose(scorer.score(FeatureBatch(KNN_SCORED.float())).normality.numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("block, rows", [(None, 5), (12, 3), (8, 2), (3, 1)])
def test_knn_oodbench_scores_in_blocks_of_at_most_the_bound(monkeypatch, block, rows):
    if block is not None:
        monkeypatch.setattr(distance, "EXACT_BLOCK_ELEMENTS", block)
    shapes = []
    exact = distance.exact_distances

    def recording(targets, references):
        shapes.append(tuple(targets.shape))
        return exact(targets, references)

    monkeypatch.setattr(distance, "exact_distances", recording)
    scorer = fitted(KnnDistanceScorer(k=2, baseline_protocol="oodbench", normalize=False), KNN_SUPPORT, KNN_LABELS)
    result = scorer.score(FeatureBatch(KNN_SCORED))
    s, x = KNN_SUPPORT.numpy(), KNN_SCORED.numpy()
    squared = ((x[:, None, :] - s[None, :, :]) ** 2).sum(axis=2)
    np.testing.assert_allclose(result.normality.numpy(), -np.sort(squared, axis=1)[:, 1], rtol=1e-14)
    assert shapes == [(min(rows, 5 - start), 3) for start in range(0, 5, rows)]


def test_knn_of_a_support_vector_is_exactly_zero():
    # [1, 1, 4] normalised has a float32 dot product with itself of 1 + 2^-23: 2 - 2 cos < 0 must clamp to 0.
    support = torch.tensor([[1.0, 1.0, 4.0], [0.0, 3.0, 1.0]])
    result = fitted(KnnDistanceScorer(), support, torch.tensor([0, 1])).score(FeatureBatch(support[:1]))
    assert result.normality.tolist() == [0.0]


@pytest.mark.parametrize("protocol", ["this", "oodbench"])
def test_knn_of_no_scored_features(protocol):
    scorer = fitted(KnnDistanceScorer(k=2, baseline_protocol=protocol), KNN_SUPPORT.float(), KNN_LABELS)
    result = scorer.score(FeatureBatch(torch.zeros(0, 3)))
    assert result.normality.shape == (0,) and result.pred.shape == (0,)
    assert result.normality.dtype == (torch.float64 if protocol == "oodbench" else torch.float32)
    assert result.pred.dtype == torch.long


def test_knn_messages():
    with pytest.raises(ValueError) as error:
        KnnDistanceScorer(normalize=1)
    assert str(error.value) == "knn normalize must be True or False, got 1"
    with pytest.raises(ValueError) as error:
        KnnDistanceScorer(normalize=False)
    assert str(error.value) == ("--knn_normalize off (kNN on raw features) is OODDetectionBench's knn_distance: "
                                "give --baseline_protocol oodbench")
    with pytest.raises(ValueError) as error:
        fitted(KnnDistanceScorer(k=5), torch.zeros(4, 7), torch.tensor([0, 0, 1, 1]))
    assert str(error.value) == "k = 5 exceeds the support set size 4"


@pytest.mark.parametrize("name, what", [("prototype_distance", "prototypes"), ("prototype_cosine", "prototypes"),
                                        ("knn", "support features"), ("mahalanobis", "class means")])
@pytest.mark.parametrize("protocol", ["this", "oodbench"])
def test_scored_feature_size_messages_name_the_fitted_reference(name, what, protocol):
    feats, labels = two_blobs()
    scorer = fitted(build_scorer(name, {"baseline_protocol": protocol}), feats, labels)
    with pytest.raises(ValueError) as error:
        scorer.score(FeatureBatch(torch.zeros(2, 4, dtype=torch.float64)))
    assert str(error.value) == f"scored features must be [M, 3] to match the {what}, got (2, 4)"


# ------------------------------------------------------------------------------------------------ Mahalanobis

def test_ledoit_wolf_of_an_isotropic_covariance_has_no_shrinkage():
    # S = X'X / n = 0.5 I: already a multiple of the identity, so d2 = 0 and the shrinkage is 0 by definition.
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=torch.float32)
    covariance, shrinkage = ledoit_wolf_covariance(x)
    assert shrinkage == 0.0 and covariance.dtype == torch.float64
    np.testing.assert_array_equal(covariance.numpy(), 0.5 * np.eye(2))


def test_empirical_covariance_recentres_and_divides_by_n():
    # Rows that are not centred, with values float32 rounds (0.1): the covariance is computed in float64.
    x = np.array([[1.1, 2.0, 0.5], [3.0, -1.0, 2.0], [0.1, 0.0, 1.0], [2.0, 5.0, -3.0], [4.0, 1.0, 0.3]])
    x32 = np.float32(x).astype(np.float64)
    centred = x32 - x32.mean(axis=0)
    ours = empirical_covariance(torch.tensor(x, dtype=torch.float32))
    assert ours.dtype == torch.float64
    np.testing.assert_allclose(ours.numpy(), centred.T @ centred / len(x), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("small, kept", [(3 * EPS64, True), (2 * EPS64, False), (1.5 * EPS64, False)])
def test_pseudo_inverse_cut_off_is_p_eps_times_the_largest(small, kept):
    # p = 2, largest eigenvalue 1: eigenvalues above 2 eps are kept (strictly), the others count as zero.
    covariance = torch.diag(torch.tensor([1.0, small], dtype=torch.float64))
    w = pseudo_inverse_whitening(covariance)
    expected = np.diag([1.0, 1.0 / small if kept else 0.0])
    np.testing.assert_allclose((w @ w.T).numpy(), expected, rtol=1e-12)
    assert w.shape == (2, 2 if kept else 1) and w.dtype == torch.float64


def test_pseudo_inverse_of_float32_is_float64_and_of_zero_is_refused():
    covariance = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    w = pseudo_inverse_whitening(covariance)
    assert w.dtype == torch.float64
    np.testing.assert_allclose((w @ w.T).numpy(), np.linalg.inv(np.array([[2.0, 0.5], [0.5, 1.0]])), rtol=1e-12)
    with pytest.raises(ValueError) as error:
        pseudo_inverse_whitening(torch.zeros(3, 3))
    assert str(error.value) == "mahalanobis (oodbench): the covariance is zero, so its pseudo-inverse is zero too"


@pytest.mark.parametrize("protocol", ["this", "oodbench"])
def test_mahalanobis_messages_and_small_within_class_spread(protocol):
    with pytest.raises(ValueError) as error:
        fitted(MahalanobisScorer(baseline_protocol=protocol), torch.eye(3), torch.tensor([0, 1, 2]))
    assert str(error.value) == ("mahalanobis: the support features do not vary within any class "
                                "(e.g. one sample per class), so no covariance can be estimated")
    # A within-class spread of 0.25 is a spread: accepted.
    support = torch.tensor([[0.0, 0.0], [0.25, 0.0], [3.0, 3.0], [3.0, 3.25]])
    scorer = fitted(MahalanobisScorer(baseline_protocol=protocol), support, torch.tensor([0, 0, 1, 1]))
    assert torch.isfinite(scorer.score(FeatureBatch(support)).normality).all()


def test_mahalanobis_cholesky_failure_is_reported(monkeypatch):
    from sklearn.covariance import LedoitWolf

    feats, labels = two_blobs()
    x = feats.numpy()
    means = np.stack([x[:4].mean(0), x[4:].mean(0)])
    shrinkage = LedoitWolf(assume_centered=True).fit(x - means[labels.numpy()]).shrinkage_
    real = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda a: (real(a)[0], torch.tensor(3, dtype=torch.int32)))
    with pytest.raises(ValueError) as error:
        fitted(MahalanobisScorer(), feats, labels)
    assert str(error.value) == (f"mahalanobis: the shrunk covariance is not positive definite "
                                f"(Cholesky failed at column 3; shrinkage {shrinkage:.3g})")


def test_gaussian_scores_check_the_feature_size():
    feats, labels = two_blobs()
    scorer = fitted(MahalanobisScorer(baseline_protocol="oodbench"), feats, labels)
    with pytest.raises(ValueError) as error:
        scorer.gaussian_scores(torch.zeros(2, 4, dtype=torch.float64))
    assert str(error.value) == "scored features must be [M, 3] to match the class means, got (2, 4)"


def test_mahalanobis_scores_float32_features_in_float64():
    # The whitening of float32 scored features happens in float64 (both protocols).
    feats, labels = two_blobs()
    scored64 = torch.tensor([[1.1, 2.3, 0.7], [4.9, 0.2, 1.3]], dtype=torch.float64)
    scored32 = scored64.float()
    for protocol in ("this", "oodbench"):
        scorer = fitted(MahalanobisScorer(baseline_protocol=protocol), feats, labels)
        ours = scorer.score(FeatureBatch(scored32)).normality
        assert ours.dtype == torch.float64
        reference = scorer.score(FeatureBatch(scored32.double())).normality
        np.testing.assert_array_equal(ours.numpy(), reference.numpy())


def test_input_step_messages_and_defaults():
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                   torch.nn.Flatten()).double()
    images = torch.randn(6, 3, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        feats = backbone(images)
    scorer = fitted(MahalanobisScorer(baseline_protocol="oodbench"), feats, torch.arange(2).repeat(3))
    with pytest.raises(ValueError) as error:
        oodbench_input_step(backbone, images, MahalanobisScorer())
    assert str(error.value) == "oodbench_input_step needs a mahalanobis scorer fitted with baseline_protocol='oodbench'"
    for shape in ((2, 1, 5, 5), (2, 3, 5)):
        with pytest.raises(ValueError) as error:
            oodbench_input_step(backbone, torch.zeros(shape, dtype=torch.float64), scorer)
        assert str(error.value) == f"images must be [B, 3, H, W], got {shape}"
    # Defaults: epsilon 0.001 and the harness's channel std; the loss's sign alone sets the step.
    with torch.device("meta"):  # tensors made inside must follow the images' device, not the default one
        moved = oodbench_input_step(backbone, images, scorer)
    pixels = images.clone().requires_grad_(True)
    whitened = backbone(pixels) @ scorer.whitening
    nearest = torch.cdist(whitened, scorer.whitened_prototypes).argmin(dim=1)
    (whitened - scorer.whitened_prototypes[nearest]).pow(2).sum().backward()
    std = torch.tensor([0.2023, 0.1994, 0.2010], dtype=torch.float64).view(1, 3, 1, 1)
    step = torch.where(pixels.grad >= 0, 1.0, -1.0) / std
    with torch.no_grad():
        np.testing.assert_allclose(moved.numpy(), backbone(images - 0.001 * step).numpy(), rtol=0, atol=1e-13)


def test_input_step_counts_a_zero_gradient_as_positive():
    # The feature reads relu(pixel) at one pixel held at exactly 0: relu's gradient there is 0, so the step is
    # +epsilon / std down, the pixel becomes negative and the feature stays 0 (a -1 step would make it positive).
    class Probe(torch.nn.Module):
        def forward(self, x):
            return torch.stack([x[:, 0, 0, 0], torch.relu(x[:, 1, 0, 0]), x[:, 2, 0, 0]], dim=1)

    images = torch.zeros(4, 3, 2, 2)  # float32 images and features: the Mahalanobis part is float64
    images[:, 0, 0, 0] = torch.tensor([0.0, 1.0, 0.5, 2.0])
    images[:, 2, 0, 0] = torch.tensor([1.0, 0.0, 2.0, 0.5])
    backbone = Probe()
    labels = torch.tensor([0, 0, 1, 1])
    support = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.3, 0.0], [0.5, 0.1, 2.0], [2.0, 0.7, 0.5]], dtype=torch.float64)
    scorer = fitted(MahalanobisScorer(baseline_protocol="oodbench"), support, labels)
    moved = oodbench_input_step(backbone, images, scorer, epsilon=0.01)
    assert moved[:, 1].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert moved.dtype == torch.float32


# ---------------------------------------------------------------------------------------------- linear probe

def test_linear_probe_messages_and_empty_scores():
    with pytest.raises(ValueError) as error:
        LinearProbeScorer(max_iter=0)
    assert str(error.value) == "max_iter must be a positive integer, got 0"
    with pytest.raises(ValueError) as error:
        fitted(LinearProbeScorer(), torch.zeros(3, 2), torch.tensor([0, 0, 0]))
    assert str(error.value) == "linear_probe needs at least two support classes, got one"
    feats, labels = two_blobs()
    scorer = fitted(LinearProbeScorer(), feats, labels)
    for shape in ((2, 4), (3,), (2, 3, 1)):
        with pytest.raises(ValueError) as error:
            scorer.score(FeatureBatch(torch.zeros(shape)))
        assert str(error.value) == f"scored features must be [M, 3], got {shape}"
    empty = scorer.score(FeatureBatch(torch.zeros(0, 3)))
    assert empty.normality.shape == (0,) and empty.normality.dtype == torch.float64
    assert empty.pred.shape == (0,) and empty.pred.dtype == torch.long
    one = scorer.score(FeatureBatch(torch.tensor([[5.0, 0.5, 0.5]])))
    assert one.normality.shape == (1,) and one.pred.tolist() == [0]


def test_linear_probe_is_the_documented_pipeline():
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(3), 6)
    feats = rng.normal(size=(18, 4)) + 2.0 * rng.normal(size=(3, 4))[labels] + 10.0
    scored = rng.normal(size=(7, 4)) + 10.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for max_iter in (2, 1000):
            reference = make_pipeline(StandardScaler(), LogisticRegression(solver="lbfgs", max_iter=max_iter))
            result = fitted(LinearProbeScorer(max_iter=max_iter), torch.tensor(feats, dtype=torch.float32),
                            torch.tensor(labels)).score(FeatureBatch(torch.tensor(scored, dtype=torch.float32)))
            expected = reference.fit(np.float32(feats).astype(np.float64), labels).predict_proba(
                np.float32(scored).astype(np.float64))
            np.testing.assert_allclose(result.normality.numpy(), expected.max(axis=1), rtol=1e-9)
            assert result.pred.dtype == torch.long and result.pred.tolist() == expected.argmax(axis=1).tolist()
        for n_classes in (2, 3):
            keep = labels < n_classes
            binary = LogisticRegression(solver="liblinear", C=0.316, max_iter=1000, random_state=0)
            reference = OneVsRestClassifier(binary) if n_classes > 2 else binary
            reference.fit(feats[keep], labels[keep])
            result = fitted(LinearProbeScorer(baseline_protocol="oodbench"), torch.tensor(feats[keep]),
                            torch.tensor(labels[keep])).score(FeatureBatch(torch.tensor(scored)))
            np.testing.assert_array_equal(result.normality.numpy(), reference.predict_proba(scored).max(axis=1))


# ------------------------------------------------------------------------------------------ logit scorers

def test_percent_parses_the_open_interval():
    assert percent("0.5") == 0.5 and percent("99.5") == 99.5 and percent("1") == 1.0
    for text, message in (("abc", "expected a number, got 'abc'"), ("0", "must be a percentile in (0, 100), got 0"),
                          ("100", "must be a percentile in (0, 100), got 100"),
                          ("-3", "must be a percentile in (0, 100), got -3")):
        with pytest.raises(argparse.ArgumentTypeError) as error:
            percent(text)
        assert str(error.value) == message
    assert check_percent(50, "x") == 50.0 and isinstance(check_percent(50, "x"), float)
    assert check_percent(0.5, "x") == 0.5 and check_percent(99.5, "x") == 99.5
    for value in (True, "50", 0, 0.0, 100, 100.5, -1):
        with pytest.raises(ValueError) as error:
            check_percent(value, "the percentile")
        assert str(error.value) == f"the percentile must be a percentile in (0, 100), got {value!r}"
    for name, flag, what in (("react", "react_percentile", "react percentile"),
                             ("ash_b", "ash_percentile", "ash percentile")):
        with pytest.raises(ValueError) as error:
            build_scorer(name, {flag: 100})
        assert str(error.value) == f"{what} must be a percentile in (0, 100), got 100"
    for cls in (classifier.EnergyScorer, classifier.ReActScorer):
        with pytest.raises(ValueError) as error:
            cls(max_iter=0)
        assert str(error.value) == "max_iter must be a positive integer, got 0"


@pytest.mark.parametrize("name", ["energy", "max_logit", "react", "ash_b"])
def test_logit_scorers_take_two_classes_and_name_themselves_with_one(name):
    feats, labels = two_blobs(dim=3)
    feats = torch.cat([feats, feats + 0.5]).abs()
    labels = torch.cat([labels, labels])
    scorer = fitted(build_scorer(name, {"ash_percentile": 50.0}), feats, labels)
    assert scorer.weight.shape == (2, 3)
    with pytest.raises(ValueError) as error:
        fitted(build_scorer(name), feats, torch.zeros(len(feats), dtype=torch.long))
    assert str(error.value) == (f"{name} reads the logits of a classifier of the known classes: it needs at least "
                                "two support classes, got one")


def test_logits_of_float32_features_are_float64():
    feats, labels = two_blobs()
    scorer = fitted(build_scorer("energy"), feats, labels)
    scored = torch.tensor([[1.1, 0.3, 2.7]])
    logits = scorer.logits(scored)
    assert logits.dtype == torch.float64
    expected = scored.double().numpy() @ scorer.weight.numpy().T + scorer.bias.numpy()
    np.testing.assert_allclose(logits.numpy(), expected, rtol=1e-15)


def test_head_cache_is_keyed_by_support_and_max_iter():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), 5)
    feats = rng.normal(size=(15, 4)) + 3.0 * rng.normal(size=(3, 4))[labels]

    def reference(x, y, max_iter):
        scaler = StandardScaler().fit(x)
        probe = LogisticRegression(solver="lbfgs", max_iter=max_iter).fit(scaler.transform(x), y)
        weight = probe.coef_ / scaler.scale_
        return weight, probe.intercept_ - weight @ scaler.mean_

    fits = FitCache()  # one cache for all four: each must still get its own fit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for x, y, max_iter in ((feats, labels, 1), (feats, labels, 1000), (feats, labels[::-1].copy(), 1000),
                               (feats * 2.0, labels, 1000)):
            weight, bias = fit_linear_head(x, y, max_iter, fits)
            expected_weight, expected_bias = reference(x, y, max_iter)
            np.testing.assert_allclose(weight, expected_weight, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(bias, expected_bias, rtol=1e-12, atol=1e-12)


def test_ash_b_keeps_at_least_one_activation():
    # 4 activations at 75 %: round(3) pruned, 1 kept, set to the row's sum.
    x = torch.tensor([[1.0, 4.0, 2.0, 3.0], [0.5, 0.0, 0.25, 0.25]])
    assert ash_b(x, 75.0).tolist() == [[0.0, 10.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]
    # 10 activations at 95 %: round(9.5) = 10 pruned (numpy rounds half to even), none kept; at 94 %: 1 kept.
    with pytest.raises(ValueError) as error:
        ash_b(torch.ones(2, 10), 95.0)
    assert str(error.value) == "ASH-B keeps no activation of 10 at percentile 95.0"
    assert (ash_b(torch.rand(2, 10), 94.0) > 0).sum(dim=1).tolist() == [1, 1]
    labels = torch.tensor([0, 0, 1, 1])
    support4 = torch.tensor([[1.0, 0.0, 0.0, 2.0], [2.0, 0.0, 1.0, 1.0], [0.0, 3.0, 1.0, 0.0], [0.0, 2.0, 2.0, 0.0]])
    fitted(build_scorer("ash_b", {"ash_percentile": 75.0}), support4, labels)  # one kept: accepted
    support10 = torch.rand(4, 10, generator=torch.Generator().manual_seed(0))
    fitted(build_scorer("ash_b", {"ash_percentile": 94.0}), support10, labels)
    with pytest.raises(ValueError) as error:
        fitted(build_scorer("ash_b", {"ash_percentile": 95.0}), support10, labels)
    assert str(error.value) == "ASH-B at percentile 95.0 keeps none of the 10 activations"


def test_ash_b_ties_keep_the_first_columns_on_long_rows():
    # Many equal activations: the kept ones are the first in column order (a stable descending sort).
    x = torch.ones(3, 64)
    x[1, 10] = 2.0
    out = ash_b(x, 50.0)
    keep = 32
    expected = torch.zeros(3, 64)
    expected[0, :keep] = 64 / keep
    expected[1, 10] = 65 / keep
    expected[1, [c for c in range(64) if c != 10][:keep - 1]] = 65 / keep
    expected[2, :keep] = 64 / keep
    assert torch.equal(out, expected)


# --------------------------------------------------------------------------------------------- prototype maps

def test_map_reduction_and_save_maps_messages():
    assert reduction_choice("min") == "min" and reduction_choice("mean") == "mean"
    with pytest.raises(argparse.ArgumentTypeError) as error:
        reduction_choice("max")
    assert str(error.value) == "must be one of min, mean, got 'max'"
    with pytest.raises(ValueError) as error:
        PrototypeMapScorer(reduction="max")
    assert str(error.value) == "prototype_map reduction must be one of min, mean, got 'max'"
    for value in (True, -1, 2.0, "2"):
        with pytest.raises(ValueError) as error:
            PrototypeMapScorer(save_maps=value)
        assert str(error.value) == f"save_maps must be a non-negative integer, got {value!r}"
    assert PrototypeMapScorer(save_maps=0).save_maps == 0 and PrototypeMapScorer(save_maps=3).save_maps == 3


def test_novelty_maps_dtype_follows_the_prototypes():
    maps_ = torch.tensor([[[[2.0]], [[1.0]]]], dtype=torch.float16)
    for dtype, expected in ((torch.float64, torch.float64), (torch.float32, torch.float32),
                            (torch.float16, torch.float32)):
        novelty, cls = novelty_maps(maps_, torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=dtype))
        assert novelty.dtype == expected and cls.tolist() == [[[0]]]
        assert float(novelty) == pytest.approx(1 - 2 / math.sqrt(5), abs=1e-3)


def test_prototype_map_prototypes_keep_float64_and_convert_integers():
    labels = torch.tensor([0, 0, 1])
    for feats, dtype in ((torch.tensor([[3, 4], [3, 4], [0, 2]]), torch.float32),
                         (torch.tensor([[3.0, 4.0], [3.0, 4.0], [0.0, 2.0]], dtype=torch.float64), torch.float64),
                         (torch.tensor([[3.0, 4.0], [3.0, 4.0], [0.0, 2.0]], dtype=torch.float16), torch.float32)):
        scorer = fitted(PrototypeMapScorer(), feats, labels)
        assert scorer.prototypes.dtype == dtype
        np.testing.assert_allclose(scorer.prototypes.double().numpy(), [[0.6, 0.8], [0.0, 1.0]], rtol=1e-7)


def prototype_map_expected(feature_maps, prototypes, reduction):
    """Normality and novelty maps from the documented formula, in numpy."""
    m = feature_maps.numpy().astype(np.float64)
    unit = m / np.linalg.norm(m, axis=1, keepdims=True)
    cosine = np.einsum("mdhw,cd->mchw", unit, prototypes)
    novelty = 1.0 - cosine.max(axis=1)
    flat = novelty.reshape(len(novelty), -1)
    return 1.0 - (flat.max(axis=1) if reduction == "min" else flat.mean(axis=1)), novelty


@pytest.mark.parametrize("reduction", ["min", "mean"])
def test_prototype_map_scores_in_chunks(monkeypatch, reduction):
    monkeypatch.setattr(maps, "MAP_CHUNK", 2)
    g = torch.Generator().manual_seed(0)
    support = torch.rand(6, 4, generator=g)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    feature_maps = torch.rand(5, 4, 2, 3, generator=g)
    feats = feature_maps.mean(dim=(2, 3))
    scorer = fitted(PrototypeMapScorer(reduction=reduction), support, labels)
    result = scorer.score(FeatureBatch(feats, feature_maps=feature_maps))
    s = support.numpy().astype(np.float64)
    means = np.stack([s[2 * c:2 * c + 2].mean(0) for c in range(3)])
    prototypes = means / np.linalg.norm(means, axis=1, keepdims=True)
    normality, novelty = prototype_map_expected(feature_maps, prototypes, reduction)
    np.testing.assert_allclose(result.normality.numpy(), normality, rtol=0, atol=1e-6)
    np.testing.assert_allclose(result.maps.numpy(), novelty, rtol=0, atol=1e-6)
    pooled = feats.numpy() / np.linalg.norm(feats.numpy(), axis=1, keepdims=True) @ prototypes.T
    assert result.pred.tolist() == pooled.argmax(axis=1).tolist()


def test_prototype_map_of_no_images_and_wrong_maps():
    scorer = fitted(PrototypeMapScorer(), torch.eye(3), torch.tensor([0, 1, 2]))
    empty = scorer.score(FeatureBatch(torch.zeros(0, 3), feature_maps=torch.zeros(0, 3, 2, 2)))
    assert empty.normality.shape == (0,) and empty.maps.shape == (0, 2, 2) and empty.maps.dtype == torch.float32
    assert empty.pred.shape == (0,)
    for shape in ((2, 3, 2), (3, 3, 2, 2), (2, 4, 2, 2)):
        with pytest.raises(ValueError) as error:
            scorer.score(FeatureBatch(torch.ones(2, 3), feature_maps=torch.ones(shape)))
        assert str(error.value) == f"feature_maps must be [2, 3, h, w], got {shape}"


def test_head_is_fitted_in_float64_and_predicts_on_the_unmodified_features():
    # float32 support features: the head is still float64. ReAct and ASH-B change only the normality: their
    # prediction is the head's argmax on the raw features, which clipping or pruning would change here.
    support = torch.tensor([[9.0, 0.0, 1.0, 0.0], [8.0, 1.0, 0.0, 0.0], [7.0, 0.0, 0.0, 1.0],
                            [0.0, 3.0, 1.0, 1.0], [1.0, 2.0, 1.0, 1.0], [0.0, 2.0, 2.0, 1.0]])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    scored = torch.tensor([[3.0, 0.0, 1.0, 1.0], [0.0, 3.0, 0.0, 0.0], [4.0, 3.0, 3.0, 3.0], [5.0, 3.0, 0.0, 0.0]])
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x64 = support.double().numpy()
    scaler = StandardScaler().fit(x64)
    probe = LogisticRegression(solver="lbfgs", max_iter=1000).fit(scaler.transform(x64), labels.numpy())
    for name, options in (("react", {"react_percentile": 50.0}), ("ash_b", {"ash_percentile": 75.0})):
        scorer = fitted(build_scorer(name, options), support, labels)
        assert scorer.weight.dtype == torch.float64 and scorer.bias.dtype == torch.float64
        np.testing.assert_allclose(scorer.weight.numpy()[1], probe.coef_[0] / scaler.scale_ / 2, rtol=1e-10)
        result = scorer.score(FeatureBatch(scored))
        raw = scored.double().numpy() @ scorer.weight.numpy().T + scorer.bias.numpy()
        shaped = scorer.transform(scored.double()).numpy() @ scorer.weight.numpy().T + scorer.bias.numpy()
        assert result.pred.tolist() == raw.argmax(axis=1).tolist()
        assert raw.argmax(axis=1).tolist() != shaped.argmax(axis=1).tolist()
        np.testing.assert_allclose(result.normality.numpy(), np.log(np.exp(shaped).sum(axis=1)), rtol=1e-12)


def test_head_cache_tells_feature_shapes_apart():
    # A 3 x 3 support with labels [0, 0, 1] and a 2 x 5 one (the same nine numbers and a 0.0) with labels
    # [0, 1] hash the same bytes; only the shape in the digest tells them apart.
    nine = np.array([[3.0, 1.0, 0.5], [2.0, 0.0, 1.5], [0.0, 4.0, 2.0]])
    five = np.append(nine.ravel(), 0.0).reshape(2, 5)
    fits = FitCache()
    first_weight, _ = fit_linear_head(nine, np.array([0, 0, 1]), 1000, fits)
    second_weight, _ = fit_linear_head(five, np.array([0, 1]), 1000, fits)
    assert first_weight.shape == (2, 3) and second_weight.shape == (2, 5)


# ------------------------------------------------------------------------------------------------------ flow

from evaluation.scorers.density import AffineCoupling, CouplingFlow, FlowScorer, held_out_mask  # noqa: E402


def flow_problem(seed=0, dim=6, per=20, classes=3):
    """Gaussian classes with a different spread per dimension (some below 1, some above)."""
    g = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(classes, dim, generator=g)
    labels = torch.arange(classes).repeat_interleave(per)
    return centres[labels] + torch.randn(len(labels), dim, generator=g) * torch.linspace(0.3, 2.0, dim), labels


def class_gaussian_nll(z, labels, means, log_std, log_det=None):
    """-(mean over rows of log N(z; mean of the row's class, diag exp(log_std)^2) + log_det) / k, in float64."""
    z, means, log_std = z.double(), means.double(), log_std.double()
    k = z.shape[1]
    log_n = (-0.5 * ((z - means[labels]) / log_std.exp()).pow(2).sum(dim=1) - log_std.sum()
             - 0.5 * k * math.log(2 * math.pi))
    if log_det is not None:
        log_n = log_n + log_det.double()
    return float(-log_n.mean() / k)


def gaussian_start(u, labels, n_classes):
    """Class means and log of the pooled within-class RMS per coordinate, floored at 0.01."""
    means = torch.stack([u[labels == c].mean(dim=0) for c in range(n_classes)])
    return means, torch.log((u - means[labels]).pow(2).mean(dim=0).sqrt().clamp(min=0.01))


def test_flow_messages():
    for name in ("layers", "hidden", "dims", "batch_size"):
        with pytest.raises(ValueError) as error:
            FlowScorer(**{name: 0})
        assert str(error.value) == f"flow {name} must be a positive integer, got 0"
    for name in ("epochs", "seed"):
        for value in (-1, True, 1.0):
            with pytest.raises(ValueError) as error:
                FlowScorer(**{name: value})
            assert str(error.value) == f"flow {name} must be a non-negative integer, got {value!r}"
        assert getattr(FlowScorer(**{name: 0}), name) == 0
    for value in (0, -1e-3, math.inf, math.nan, True, "0.1"):
        with pytest.raises(ValueError) as error:
            FlowScorer(lr=value)
        assert str(error.value) == f"flow lr must be a positive number, got {value!r}"
    assert FlowScorer(lr=2).lr == 2
    with pytest.raises(ValueError) as error:
        fitted(FlowScorer(), torch.rand(6, 1), torch.tensor([0, 0, 0, 1, 1, 1]))
    assert str(error.value) == "flow needs features of at least 2 dimensions, got 1"
    with pytest.raises(ValueError) as error:
        fitted(FlowScorer(), torch.eye(3), torch.tensor([0, 1, 2]))
    assert str(error.value) == ("flow: the support features do not vary within any class (e.g. one sample per "
                                "class), so no within-class spread can be estimated")
    small = torch.tensor([[0.0, 0.0], [0.25, 0.0], [3.0, 3.0], [3.0, 3.25]])  # a spread of 0.25 is a spread
    fitted(FlowScorer(epochs=0), small, torch.tensor([0, 0, 1, 1]))
    for dim, permutation in ((1, [0]), (3, [0, 0, 2]), (3, [0, 1])):
        with pytest.raises(ValueError) as error:
            AffineCoupling(dim, torch.tensor(permutation), hidden=4)
        assert str(error.value) == f"a coupling needs dim >= 2 and a permutation of 0..dim-1, got dim {dim}"
    with pytest.raises(ValueError) as error:
        CouplingFlow(1, 2, 4, torch.Generator())
    assert str(error.value) == "a coupling flow needs at least 2 feature dimensions, got 1"


def test_random_draws_come_from_the_seeded_generator_only():
    # The couplings' permutations are the generator's first draws; the global random state plays no part.
    torch.manual_seed(123)
    flow = CouplingFlow(6, 3, 8, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    assert [c.permutation.tolist() for c in flow.couplings] == [torch.randperm(6, generator=g).tolist()
                                                                for _ in range(3)]
    # Held-out samples: floor(share * n_c) of each class, the generator's permutation of the class's members.
    labels = torch.tensor([0, 1, 2, 1, 0] * 5 + [1] * 10 + [0] * 3)
    torch.manual_seed(7)
    mask = held_out_mask(labels, 3, 0.1, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    expected = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(3):
        members = torch.nonzero(labels == c).flatten()
        expected[members[torch.randperm(len(members), generator=g)[:int(len(members) * 0.1)]]] = True
    assert torch.equal(mask, expected) and [int(mask[labels == c].sum()) for c in range(3)] == [1, 2, 0]
    # The whole fit: the same result whatever the global random state.
    x, labels = flow_problem()
    results = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        scorer = fitted(FlowScorer(epochs=2, lr=1e-2, batch_size=7, dims=4, hidden=8, layers=2), x, labels)
        results.append((scorer.held_out, scorer.score(FeatureBatch(x[:5])).normality))
    assert results[0][0] == results[1][0] and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("batch_size, best_epoch", [(64, 1), (7, 2)])
def test_flow_training_records_the_start_and_keeps_the_best_epoch(batch_size, best_epoch):
    x, labels = flow_problem()
    held = held_out_mask(labels, 3, 0.1, torch.Generator().manual_seed(0))
    # The start (an identity flow over the Gaussian classifier), fitted on the training part only.
    reference = FlowScorer(dims=4)
    u, k = reference._project_support(x[~held], labels[~held], 3)
    held_u = reference._coordinates(x[held])
    means, log_std = gaussian_start(u, labels[~held], 3)
    scorer = fitted(FlowScorer(epochs=6, lr=1e-2, batch_size=batch_size, dims=4, hidden=8, layers=2), x, labels)
    assert len(scorer.losses) == 6 and len(scorer.held_out) == 7
    assert scorer.held_out[0] == pytest.approx(class_gaussian_nll(held_u, labels[held], means, log_std), rel=1e-5)
    if batch_size >= len(u):  # one step per epoch: the first loss is the start's
        assert scorer.losses[0] == pytest.approx(class_gaussian_nll(u, labels[~held], means, log_std), rel=1e-5)
    assert scorer.best_epoch == best_epoch == int(np.argmin(scorer.held_out))
    # Trained: the statistics stay those of the training part, and the kept state is the best epoch's.
    torch.testing.assert_close(scorer.mean, x[~held].mean(dim=0))
    with torch.no_grad():
        z, log_det = scorer.flow(scorer._coordinates(x[held]))
    kept = class_gaussian_nll(z, labels[held], scorer.base_means, scorer.base_log_std, log_det)
    assert kept == pytest.approx(scorer.held_out[best_epoch], rel=1e-5)


def test_flow_losses_visit_every_training_feature_once_per_epoch():
    # A learning rate of 1e-30 leaves the state as it starts: every batch's loss is the start's, so the epoch's
    # loss is the start's NLL over the training features whatever the batch size.
    x, labels = flow_problem()
    held = held_out_mask(labels, 3, 0.1, torch.Generator().manual_seed(0))
    reference = FlowScorer(dims=4)
    u, _ = reference._project_support(x[~held], labels[~held], 3)
    means, log_std = gaussian_start(u, labels[~held], 3)
    expected = class_gaussian_nll(u, labels[~held], means, log_std)
    for batch_size in (7, 10, 54, 512):
        scorer = fitted(FlowScorer(epochs=2, lr=1e-30, batch_size=batch_size, dims=4, hidden=8, layers=2), x, labels)
        assert scorer.losses == pytest.approx([expected, expected], rel=1e-5)
        assert scorer.held_out[1] == pytest.approx(scorer.held_out[0], rel=1e-6)


def test_flow_trains_with_one_held_out_feature_and_not_without():
    x, labels = flow_problem(dim=3, per=10, classes=2)
    keep = torch.cat([torch.arange(10), torch.arange(10, 15)])  # 10 and 5 features: one held out
    scorer = fitted(FlowScorer(epochs=2, dims=2, hidden=4, layers=1), x[keep], labels[keep])
    assert len(scorer.losses) == 2 and len(scorer.held_out) == 3
    tiny = fitted(FlowScorer(epochs=2, dims=2, hidden=4, layers=1), x[::3], labels[::3])
    assert tiny.losses == [] and tiny.held_out == [] and tiny.best_epoch == 0
    # Held-out features but no epoch: the start, refitted on every support feature.
    start = fitted(FlowScorer(epochs=0, dims=2), x, labels)
    assert start.best_epoch == 0 and start.held_out == [pytest.approx(start.held_out[0])]
    torch.testing.assert_close(start.mean, x.mean(dim=0))


def whitening_checks(scorer, x, labels, n_classes, k):
    """The fitted statistics against their definitions, computed in float64 with numpy/scikit-learn."""
    from sklearn.covariance import LedoitWolf

    feats = x.double().numpy()
    lab = labels.numpy()
    centred = feats - feats.mean(axis=0)
    means = np.stack([centred[lab == c].mean(axis=0) for c in range(n_classes)])
    covariance = LedoitWolf(assume_centered=True).fit(centred - means[lab]).covariance_
    w = scorer.whitening.double().numpy()
    np.testing.assert_allclose(w.T @ covariance @ w, np.eye(len(w)), atol=1e-4)
    assert scorer.log_det_whitening == pytest.approx(-0.5 * np.linalg.slogdet(covariance)[1], rel=1e-6, abs=1e-6)
    y = centred @ w
    spread = np.sort(np.linalg.eigvalsh(y.T @ y / len(y)))[::-1]
    c = scorer.components.double().numpy()
    assert c.shape == (len(w), k)
    np.testing.assert_allclose(c.T @ c, np.eye(k), atol=1e-5)
    np.testing.assert_allclose(c.T @ (y.T @ y / len(y)) @ c, np.diag(spread[:k]), atol=1e-3 * spread[0])
    np.testing.assert_allclose(scorer.scales.double().numpy(), np.sqrt(np.maximum(spread[:k], 1e-4)), rtol=1e-4)
    np.testing.assert_allclose(scorer.log_priors.numpy(), np.log(np.bincount(lab) / len(lab)), rtol=1e-6)
    return spread


def test_flow_statistics_follow_their_definitions():
    x, labels = flow_problem()
    scorer = fitted(FlowScorer(epochs=0, dims=4), x, labels)  # no epoch: refitted on every support feature
    spread = whitening_checks(scorer, x, labels, 3, 4)
    assert scorer.residual_var == pytest.approx(max(spread[4:].mean(), 1.0), rel=1e-4)
    narrow = fitted(FlowScorer(epochs=0, dims=2), x, labels)
    assert narrow.components.shape == (6, 2)
    # Fewer features than dimensions: the flow keeps the support's rank (5 of 8); the rest has variance 1.
    g = torch.Generator().manual_seed(4)
    few, few_labels = 2.0 * torch.randn(6, 8, generator=g), torch.tensor([0, 0, 0, 1, 1, 1])
    scorer = fitted(FlowScorer(epochs=0), few, few_labels)
    whitening_checks(scorer, few, few_labels, 2, 5)
    assert scorer.residual_var == 1.0


def test_flow_scale_floor():
    # The second dimension barely varies: its whitened spread is far below 0.01^2, so its scale is 0.01.
    x = torch.tensor([[0.0, 0.0], [1.0, 1e-6], [2.0, 0.0], [3.0, 1e-6], [5.0, 0.0], [6.0, 1e-6], [7.0, 0.0]])
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    scorer = fitted(FlowScorer(epochs=0), x, labels)
    assert float(scorer.scales[1]) == pytest.approx(0.01, rel=1e-6)


@pytest.mark.parametrize("perturb", [False, True])
def test_flow_log_likelihood_formula(perturb):
    x, labels = flow_problem()
    scorer = fitted(FlowScorer(epochs=0, dims=2, hidden=8, layers=2), x, labels)
    if perturb:
        torch.manual_seed(0)
        for layer in scorer.flow.couplings:
            torch.nn.init.normal_(layer.net[2].weight, std=0.05)
    scored = torch.cat([x[::7], 2.0 * torch.randn(3, 6, generator=torch.Generator().manual_seed(1))])
    y = ((scored.float() - scorer.mean) @ scorer.whitening).double()
    c = scorer.components.double()
    s = scorer.scales.double()
    u = y @ c
    with torch.no_grad():
        z, log_det = scorer.flow((u / s).float())
    z = z.double()
    sigma = scorer.base_log_std.double().exp()
    log_n = (-0.5 * ((z[:, None, :] - scorer.base_means.double()[None]) / sigma).pow(2).sum(dim=2)
             - torch.log(sigma).sum() - 0.5 * 2 * math.log(2 * math.pi))
    joint = log_n + scorer.log_priors.double()
    residual = y - u @ c.T
    v = scorer.residual_var
    expected = (torch.logsumexp(joint, dim=1) + log_det.double() + scorer.log_det_whitening - torch.log(s).sum()
                - 0.5 * residual.pow(2).sum(dim=1) / v - 0.5 * 4 * math.log(2 * math.pi * v))
    result = scorer.score(FeatureBatch(scored))
    assert result.normality.dtype == torch.float64
    np.testing.assert_allclose(result.normality.numpy(), expected.numpy(), rtol=1e-9)
    assert result.pred.tolist() == joint.argmax(dim=1).tolist()
    torch.testing.assert_close(scorer._coordinates(scored), (u / s).float(), rtol=1e-5, atol=1e-5)


def test_coupling_log_scale_is_bounded_by_three():
    torch.manual_seed(0)
    coupling = AffineCoupling(4, torch.tensor([2, 0, 3, 1]), hidden=5).double()
    torch.nn.init.normal_(coupling.net[2].weight, std=20.0)  # raw log-scales far beyond +-3
    x = torch.randn(6, 4, dtype=torch.float64)
    with torch.no_grad():
        y, log_det = coupling(x)
        raw, shift = coupling.net(x[:, [2, 0]]).chunk(2, dim=1)
    log_scale = 3.0 * torch.tanh(raw / 3.0)
    expected = x.clone()
    expected[:, [3, 1]] = x[:, [3, 1]] * torch.exp(log_scale) + shift
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(log_det, log_scale.sum(dim=1), rtol=1e-12, atol=1e-12)
    assert float(raw.abs().max()) > 10 and float(log_det.abs().max()) <= 6.0


# ------------------------------------------------------------------------------------------------ latent_vae

from evaluation.scorers.latent import LatentEncoder, LatentVaeScorer, balanced_batches, metric_loss  # noqa: E402


def test_latent_vae_messages():
    for name in ("latent_dim", "batch_classes", "sample_count", "hidden", "ae_dims"):
        with pytest.raises(ValueError) as error:
            LatentVaeScorer(**{name: 0})
        assert str(error.value) == f"latent_vae {name} must be a positive integer, got 0"
    for name in ("generation_epoch", "margins_epoch", "epochs", "seed"):
        for value in (-1, True, 1.0):
            with pytest.raises(ValueError) as error:
                LatentVaeScorer(**{name: value})
            assert str(error.value) == f"latent_vae {name} must be a non-negative integer, got {value!r}"
        assert getattr(LatentVaeScorer(**{name: 0}), name) == 0
    for name, positive in (("kl_coeff", False), ("margin_jump", False), ("margin_max_distance", True), ("lr", True)):
        kind = "positive" if positive else "non-negative"
        for value in (-1, -0.5, math.inf, math.nan, True, "1") + ((0, 0.0) if positive else ()):
            with pytest.raises(ValueError) as error:
                LatentVaeScorer(**{name: value})
            assert str(error.value) == f"latent_vae {name} must be a {kind} number, got {value!r}"
        for value in (1, 0.5) + (() if positive else (0, 0.0)):
            assert getattr(LatentVaeScorer(**{name: value}), name) == value
    with pytest.raises(ValueError) as error:
        LatentVaeScorer(ae_features=1)
    assert str(error.value) == "latent_vae ae_features must be True or False, got 1"


def metric_loss_expected(z, labels, margin):
    z, labels = z.double().numpy(), labels.numpy()
    dist = np.sqrt(((z[:, None, :] - z[None, :, :]) ** 2).sum(axis=2))
    same = labels[:, None] == labels[None, :]
    positives = same & ~np.eye(len(labels), dtype=bool)
    loss = 0.0
    if positives.any():
        loss += np.maximum(dist[positives] - 0.1, 0).mean()
    if (~same).any():
        loss += np.maximum(margin - dist[~same], 0).mean()
    return loss


def test_metric_loss_is_the_double_margin_contrastive_loss():
    g = torch.Generator().manual_seed(0)
    z = 0.3 * torch.randn(7, 3, generator=g, dtype=torch.float64)  # distances around 0.1-1: both margins bite
    for labels in (torch.tensor([0, 0, 1, 1, 1, 2, 2]), torch.tensor([0, 1, 2, 3, 4, 5, 6]),
                   torch.tensor([0, 0, 0, 0, 0, 0, 0])):
        for margin in (0.4, 1.5):
            assert float(metric_loss(z, labels, margin)) == pytest.approx(metric_loss_expected(z, labels, margin),
                                                                          rel=1e-9, abs=1e-12)
    assert float(metric_loss(z[:1], torch.tensor([0]), 1.0)) == 0.0
    # Two positives 0.05 apart cost nothing; two negatives 0.05 apart cost margin - 0.05.
    near = torch.tensor([[0.0, 0.0], [0.05, 0.0]], dtype=torch.float64)
    assert float(metric_loss(near, torch.tensor([0, 0]), 1.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(metric_loss(near, torch.tensor([0, 1]), 1.0)) == pytest.approx(0.95, rel=1e-6)


def test_latent_encoder_formula_and_log_variance_clamp():
    torch.manual_seed(0)
    encoder = LatentEncoder(3, 4, 2).double()
    with torch.no_grad():
        encoder.log_var.weight.mul_(40.0)
    x = torch.randn(400, 3, dtype=torch.float64)
    mu, log_var = encoder(x)
    with torch.no_grad():
        h = torch.relu(x @ encoder.body[0].weight.T + encoder.body[0].bias)
        raw = h @ encoder.log_var.weight.T + encoder.log_var.bias
        torch.testing.assert_close(mu, h @ encoder.mu.weight.T + encoder.mu.bias)
        torch.testing.assert_close(log_var, raw.clamp(-10.0, 10.0))
    assert float(raw.max()) > 11 and float(raw.min()) < -11
    assert bool(((raw > 10) & (raw < 11)).any()) and bool(((raw < -10) & (raw > -11)).any())


def test_kl_to_the_class_gaussians():
    g = torch.Generator().manual_seed(2)
    mu, log_var, z = (torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(3))
    labels = torch.tensor([1, 0, 1, 1, 2])
    prior_means = torch.randn(3, 3, generator=g, dtype=torch.float64)

    def log_normal(x, mean, std):
        return -0.5 * ((x - mean) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)

    m, v, zz, p = mu.numpy(), log_var.numpy(), z.numpy(), prior_means.numpy()[labels.numpy()]
    per_sample = (log_normal(zz, m, np.exp(0.5 * v)) - log_normal(zz, p, 0.1)).mean(axis=1)
    expected = np.mean([per_sample[labels.numpy() == c].mean() for c in (0, 1, 2)])
    ours = LatentVaeScorer._kl_to_classes(mu, log_var, z, labels, prior_means)
    assert float(ours) == pytest.approx(expected, rel=1e-12)


def latent_problem(seed=0, dim=8, per=12, classes=3):
    g = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(classes, dim, generator=g)
    labels = torch.arange(classes).repeat_interleave(per)
    feats = centres[labels] + torch.randn(len(labels), dim, generator=g)
    feats[:, 3] = 5.0  # a dead unit: its spread is floored
    return feats, labels


def test_latent_vae_standardisation_auto_encoder_and_scores():
    feats, labels = latent_problem()
    scorer = fitted(LatentVaeScorer(epochs=2, latent_dim=4, hidden=16, ae_features=True, ae_dims=3,
                                    sample_count=6), feats, labels)
    spread = feats.std(dim=0, unbiased=False)
    torch.testing.assert_close(scorer.mean, feats.mean(dim=0))
    torch.testing.assert_close(scorer.std, spread.clamp(min=1e-3 * float(spread.mean())))
    assert float(scorer.std[3]) == pytest.approx(1e-3 * float(spread.mean()), rel=1e-6)
    x = ((feats - scorer.mean) / scorer.std).double().numpy()
    # The auto-encoder: the projection on the 3 leading principal directions of the standardised support.
    eigenvalues, eigenvectors = np.linalg.eigh(x.T @ x)
    leading = eigenvectors[:, -3:]
    c = scorer.ae_components.double().numpy()
    np.testing.assert_allclose(c @ c.T, leading @ leading.T, atol=1e-4)
    errors = ((x - x @ leading @ leading.T) ** 2).mean(axis=1)
    assert scorer.recon_scale == pytest.approx(np.sort(errors)[(len(errors) - 1) // 2], rel=1e-4)
    with torch.no_grad():
        support_mu = scorer.encoder((feats - scorer.mean) / scorer.std)[0].double()
    means = torch.stack([support_mu[labels == c].mean(dim=0) for c in range(3)])
    torch.testing.assert_close(scorer.latent_means.double(), means, rtol=1e-5, atol=1e-6)
    scored = feats[::5] + torch.randn(len(feats[::5]), 8, generator=torch.Generator().manual_seed(9))
    result = scorer.score(FeatureBatch(scored))
    xs = ((scored - scorer.mean) / scorer.std).double()
    with torch.no_grad():
        mu = scorer.encoder(xs.float())[0].double()
    distance = torch.cdist(mu, scorer.latent_means.double())
    relative = ((xs.numpy() - xs.numpy() @ leading @ leading.T) ** 2).mean(axis=1) / scorer.recon_scale
    np.testing.assert_allclose(result.extra["latent_distance"].numpy(), -distance.min(dim=1).values.numpy(),
                               rtol=1e-6)
    np.testing.assert_allclose(result.normality.numpy(), -distance.min(dim=1).values.numpy() * relative, rtol=1e-4)
    assert result.pred.tolist() == distance.argmin(dim=1).tolist()
    plain = fitted(LatentVaeScorer(epochs=2, latent_dim=4, hidden=16, sample_count=6), feats, labels)
    plain_result = plain.score(FeatureBatch(scored))
    assert plain.ae_components is None and plain_result.extra == {}
    with torch.no_grad():
        plain_mu = plain.encoder(((scored - plain.mean) / plain.std).float())[0].double()
    np.testing.assert_allclose(plain_result.normality.numpy(),
                               -torch.cdist(plain_mu, plain.latent_means.double()).min(dim=1).values.numpy(), rtol=1e-6)


def test_documented_hyperparameter_defaults():
    defaults = {
        "knn": {"k": 1, "normalize": True, "baseline_protocol": "this"},
        "linear_probe": {"max_iter": 1000, "baseline_protocol": "this"},
        "energy": {"max_iter": 1000}, "react": {"percentile": 90.0}, "ash_b": {"percentile": 65.0},
        "prototype_map": {"reduction": "min", "save_maps": 0},
        "flow": {"layers": 4, "hidden": 64, "dims": 64, "epochs": 20, "lr": 1e-3, "batch_size": 512, "seed": 0},
        "latent_vae": {"latent_dim": 32, "kl_coeff": 0.1, "generation_epoch": 5, "margin_jump": 1.0,
                       "margins_epoch": 0, "margin_max_distance": 8.0, "batch_classes": 10, "sample_count": 32,
                       "ae_features": False, "epochs": 30, "lr": 3e-3, "hidden": 128, "ae_dims": 64, "seed": 0},
    }
    for name, values in defaults.items():
        scorer = build_scorer(name)
        assert {key: getattr(scorer, key) for key in values} == values, name
    assert build_scorer("react").shapes_activations and build_scorer("ash_b").shapes_activations
    assert not build_scorer("energy").shapes_activations and build_scorer("prototype_map").needs_feature_maps
    assert LinearProbeScorer.OODBENCH_C == 0.316 and LinearProbeScorer.OODBENCH_MAX_ITER == 1000


def test_logit_scorer_message_names_the_head():
    feats, labels = two_blobs()
    scorer = fitted(build_scorer("energy"), feats, labels)
    with pytest.raises(ValueError) as error:
        scorer.score(FeatureBatch(torch.zeros(2, 4)))
    assert str(error.value) == "scored features must be [M, 3] to match the head weights, got (2, 4)"


def test_latent_vae_margin_grows_from_margins_epoch_while_at_most_the_maximum():
    feats, labels = latent_problem(per=4)
    small = {"latent_dim": 2, "hidden": 4, "sample_count": 2}
    # From epoch 1 on, +1 per epoch: 0.15 -> 1.15 -> 2.15.
    assert fitted(LatentVaeScorer(epochs=3, margins_epoch=1, margin_jump=1.0, **small),
                  feats, labels).final_margin == pytest.approx(2.15)
    # 0.15 + 0.85 is exactly the maximum 1.0: still at most the maximum, so it grows once more, then stops.
    assert fitted(LatentVaeScorer(epochs=3, margin_jump=0.85, margin_max_distance=1.0, **small),
                  feats, labels).final_margin == 1.85
    one = fitted(LatentVaeScorer(epochs=1, ae_features=True, ae_dims=1, **small), feats, labels)
    assert one.ae_components.shape == (8, 1)


def test_balanced_batches_take_a_class_of_exactly_sample_count_once_each():
    labels = torch.tensor([0] * 4 + [1] * 9)
    generator = torch.Generator().manual_seed(0)
    for rows in balanced_batches(labels, 2, batch_classes=2, sample_count=4, generator=generator):
        assert sorted(r for r in rows.tolist() if r < 4) == [0, 1, 2, 3]
    # Smaller classes are drawn with replacement, from the generator alone.
    labels = torch.tensor([0] * 2 + [1] * 3)
    draws = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        draws.append([rows.tolist() for rows in balanced_batches(labels, 2, 2, 6, torch.Generator().manual_seed(5))])
    assert draws[0] == draws[1]


# (1, 1, 1, 2, 2): one sample per batch, a class not drawn at all in epoch 0 and drawn once in epoch 1.
@pytest.mark.parametrize("generation_epoch, batch_classes, sample_count, per, seed",
                         [(1, 2, 4, 5, 3), (2, 2, 4, 5, 3), (0, 2, 4, 5, 3), (1, 1, 1, 5, 4), (1, 1, 1, 2, 2)])
def test_latent_vae_training_is_the_documented_loop(generation_epoch, batch_classes, sample_count, per, seed):
    # Three epochs written out: margin schedule, class-balanced batches, reparameterised samples, the metric loss
    # and from generation_epoch on (never at epoch 0) the KL term to the class means of the previous epoch's
    # samples (classes not drawn keep theirs), Adam.
    feats, labels = latent_problem(per=per)
    options = dict(epochs=3, latent_dim=3, hidden=8, sample_count=sample_count, batch_classes=batch_classes,
                   generation_epoch=generation_epoch, kl_coeff=0.5, margins_epoch=1, margin_jump=0.5, lr=1e-2,
                   seed=seed)
    scorer = fitted(LatentVaeScorer(**options), feats, labels)
    mean = feats.mean(dim=0)
    spread = feats.std(dim=0, unbiased=False)
    x = (feats - mean) / spread.clamp(min=1e-3 * float(spread.mean()))
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = LatentEncoder(8, 8, 3)
    optimiser = torch.optim.Adam(encoder.parameters(), lr=1e-2)
    margin, prior_means = 0.15, torch.zeros(3, 3)
    for epoch in range(3):
        if epoch >= 1:
            margin += 0.5
        sums, counts = torch.zeros(3, 3), torch.zeros(3)
        for rows in balanced_batches(labels, 3, batch_classes, sample_count, generator):
            mu, log_var = encoder(x[rows])
            z = mu + torch.exp(0.5 * log_var) * torch.randn(mu.shape, generator=generator)
            loss = metric_loss(z, labels[rows], margin)
            if epoch >= generation_epoch and epoch > 0:
                loss = loss + 0.5 * LatentVaeScorer._kl_to_classes(mu, log_var, z, labels[rows], prior_means)
            if loss.requires_grad:  # one sample and no KL term: no pair, no step
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            for row, label in zip(z.detach(), labels[rows]):
                sums[label] += row
                counts[label] += 1
        prior_means = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], prior_means)
    with torch.no_grad():
        expected = encoder(x)[0]
    means = torch.stack([expected[labels == c].mean(dim=0) for c in range(3)])
    torch.testing.assert_close(scorer.latent_means, means, rtol=1e-4, atol=1e-5)
    assert scorer.final_margin == pytest.approx(1.15)


def test_latent_vae_trains_on_one_sample_batches():
    # One class, one sample per batch: the metric loss has no pair; until the KL term starts there is nothing to
    # learn, and the fit used to fail on the backward pass of a loss without a graph.
    feats, labels = latent_problem(per=6, classes=1)
    scorer = fitted(LatentVaeScorer(epochs=2, latent_dim=2, hidden=4, sample_count=1, generation_epoch=1),
                    feats, labels)
    assert torch.isfinite(scorer.score(FeatureBatch(feats)).normality).all()
