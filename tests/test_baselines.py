"""Tests for the post-hoc scorers (evaluation/scorers/distance.py, featurenorm.py, probe.py) and jigsaw shuffling."""
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.covariance import LedoitWolf

from evaluation.scorers.distance import (
    KnnDistanceScorer,
    MahalanobisScorer,
    PrototypeCosineScorer,
    PrototypeDistanceScorer,
    ledoit_wolf_covariance,
)
from evaluation.scorers.featurenorm import FeatureNormScorer
from evaluation.scorers.probe import LinearProbeScorer
from evaluation.jigsaw import JigsawTransform, jigsaw_shuffle
from evaluation.metrics import auroc
from evaluation.scorers import SCORERS, FeatureBatch, ScoringInputs, build_scorer

def fit(scorer, feats, labels, block_norms=None, jigsaw_block_norms=None):
    """Fit on plain tensors, in the bundle the evaluation engine hands every scorer."""
    jigsaw = None if jigsaw_block_norms is None else FeatureBatch(torch.zeros(len(jigsaw_block_norms), 1),
                                                                   block_norms=jigsaw_block_norms)
    scorer.fit(ScoringInputs(FeatureBatch(feats, labels, block_norms), jigsaw=jigsaw))
    return scorer


def score(scorer, feats, block_norms=None):
    """Score plain tensors."""
    return scorer.score(FeatureBatch(feats, block_norms=block_norms))


BASELINES = ("prototype_distance", "prototype_cosine", "knn", "mahalanobis", "featurenorm", "linear_probe")
FEATURE_SCORERS = ("prototype_distance", "prototype_cosine", "knn", "mahalanobis", "linear_probe")


def gaussian_problem(seed=0, dim=32, n_classes=4, n_support=15, n_known=20, n_unknown=40):
    """Well-separated Gaussian classes (distinct directions) plus an unknown cluster far from all of them.

    The unknown cluster sits off the class subspace, above the centroid of the class centres, so that
    a classifier's confidence (linear_probe) drops there too, not only the distances.
    """
    g = torch.Generator().manual_seed(seed)
    centres = 6.0 * torch.eye(dim)[:n_classes]
    support_labels = torch.arange(n_classes).repeat_interleave(n_support)
    support = centres[support_labels] + torch.randn(len(support_labels), dim, generator=g)
    known_labels = torch.arange(n_classes).repeat_interleave(n_known)
    known = centres[known_labels] + torch.randn(len(known_labels), dim, generator=g)
    unknown_centre = centres.mean(dim=0) + 6.0 * torch.eye(dim)[dim - 1]
    unknown = unknown_centre + torch.randn(n_unknown, dim, generator=g)
    targets = torch.cat([known, unknown])
    is_known = np.r_[np.ones(len(known), bool), np.zeros(n_unknown, bool)]
    return support, support_labels, targets, is_known, known_labels


def synthetic_block_norms(is_known, n_blocks=5, good_block=3, seed=1):
    """Block norms where only `good_block` is larger for known than for novel samples."""
    g = torch.Generator().manual_seed(seed)
    norms = 1.0 + 0.1 * torch.rand(len(is_known), n_blocks, generator=g)
    norms[torch.from_numpy(is_known), good_block] += 2.0
    return norms


def fit_and_score(name, support, support_labels, targets, is_known):
    """Build `name`, fit, score; feeds synthetic block norms to block-norm scorers."""
    scorer = build_scorer(name, {"NNK": 3})
    if scorer.needs_block_norms:
        support_norms = synthetic_block_norms(np.ones(len(support), bool))
        jigsaw_norms = synthetic_block_norms(np.zeros(len(support), bool), seed=2)
        fit(scorer, support, support_labels, block_norms=support_norms, jigsaw_block_norms=jigsaw_norms)
        return score(scorer, targets, block_norms=synthetic_block_norms(is_known, seed=3))
    fit(scorer, support, support_labels)
    return score(scorer, targets)


@pytest.mark.parametrize("name", BASELINES)
def test_separated_unknown_cluster_is_detected(name):
    support, support_labels, targets, is_known, known_labels = gaussian_problem()
    result = fit_and_score(name, support, support_labels, targets, is_known)
    assert result.normality.shape == (len(targets),)
    assert auroc(result.normality.numpy(), is_known) > 0.95
    if name == "featurenorm":
        assert result.pred is None
    else:
        assert torch.equal(result.pred[: len(known_labels)], known_labels)
    # Control: the same scores against a random known/unknown assignment carry no signal.
    rng = np.random.default_rng(0)
    shuffled_auc = np.mean([auroc(result.normality.numpy(), rng.permutation(is_known)) for _ in range(20)])
    assert abs(shuffled_auc - 0.5) < 0.08


def test_shuffled_support_labels_break_mahalanobis_prototypes():
    support, support_labels, targets, is_known, known_labels = gaussian_problem()
    shuffled = support_labels[torch.randperm(len(support_labels), generator=torch.Generator().manual_seed(0))]
    scorer = MahalanobisScorer()
    fit(scorer, support, shuffled)
    result = score(scorer, targets)
    # With meaningless labels the class means collapse onto the overall mean: no class is recovered.
    accuracy = float((result.pred[: len(known_labels)] == known_labels).float().mean())
    assert accuracy < 0.6


def test_prototype_distance_and_cosine_hand_values():
    support = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [0.0, 6.0]])
    labels = torch.tensor([0, 0, 1, 1])
    targets = torch.tensor([[1.0, 1.0], [0.0, 10.0]])
    dist = PrototypeDistanceScorer()
    fit(dist, support, labels)
    result = score(dist, targets)  # means (1, 0) and (0, 5)
    assert torch.allclose(result.normality, torch.tensor([-1.0, -5.0]))
    assert result.pred.tolist() == [0, 1]
    cos = PrototypeCosineScorer()
    fit(cos, support, labels)
    result = score(cos, targets)
    assert torch.allclose(result.normality, torch.tensor([2 ** -0.5, 1.0]))
    assert result.pred.tolist() == [0, 1]


def test_knn_kth_neighbour_hand_example():
    # Unit vectors at angles 0, 10, 30, 90 degrees; the target sits at 0 degrees.
    angles = torch.deg2rad(torch.tensor([0.0, 10.0, 30.0, 90.0], dtype=torch.float64))
    support = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1) * torch.tensor([[1.0], [3.0], [0.5], [2.0]],
                                                                                        dtype=torch.float64)
    labels = torch.tensor([1, 0, 0, 1])
    target = torch.tensor([[5.0, 0.0]], dtype=torch.float64)
    for k, angle in [(1, 0.0), (2, 10.0), (3, 30.0), (4, 90.0)]:
        scorer = build_scorer("knn", {"NNK": k})
        fit(scorer, support, labels)
        result = score(scorer, target)
        expected = 2 * np.sin(np.deg2rad(angle) / 2)  # chord length between unit vectors
        assert result.normality.item() == pytest.approx(-expected, abs=1e-7)
        assert result.pred.tolist() == [1]
    with pytest.raises(ValueError, match="exceeds the support set size"):
        fit(KnnDistanceScorer(k=5), support, labels)


def test_ledoit_wolf_matches_sklearn():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 50)) @ rng.normal(size=(50, 50))
    x -= x.mean(axis=0)
    ours, shrinkage = ledoit_wolf_covariance(torch.from_numpy(x))
    reference = LedoitWolf(assume_centered=True).fit(x)
    assert shrinkage == pytest.approx(reference.shrinkage_, rel=1e-10)
    np.testing.assert_allclose(ours.numpy(), reference.covariance_, rtol=1e-10, atol=1e-12)


def test_mahalanobis_matches_numpy_with_small_support():
    # N = 20 < D = 48: the empirical covariance is singular, the shrunk one is not.
    rng = np.random.default_rng(1)
    n_classes, per_class, dim = 4, 5, 48
    labels = np.repeat(np.arange(n_classes), per_class)
    support = rng.normal(size=(n_classes * per_class, dim)) + 3 * rng.normal(size=(n_classes, dim))[labels]
    targets = rng.normal(size=(7, dim)) * 2
    means = np.stack([support[labels == c].mean(axis=0) for c in range(n_classes)])
    covariance = LedoitWolf(assume_centered=True).fit(support - means[labels]).covariance_
    precision = np.linalg.inv(covariance)
    diffs = targets[:, None, :] - means[None, :, :]
    dist = np.sqrt(np.einsum("mcd,de,mce->mc", diffs, precision, diffs))

    scorer = MahalanobisScorer()
    fit(scorer, torch.from_numpy(support).float(), torch.from_numpy(labels))
    result = score(scorer, torch.from_numpy(targets).float())
    assert result.normality.dtype == torch.float64
    # float32 inputs: compare with the float32-rounded features' exact values.
    np.testing.assert_allclose(result.normality.numpy(), -dist.min(axis=1), rtol=1e-5)
    assert result.pred.tolist() == dist.argmin(axis=1).tolist()


def test_mahalanobis_rejects_support_without_within_class_variation():
    with pytest.raises(ValueError, match="do not vary within any class"):
        fit(MahalanobisScorer(), torch.eye(3), torch.tensor([0, 1, 2]))


def test_featurenorm_selects_block_with_largest_ratio():
    support_norms = torch.tensor([[2.0, 4.0, 9.0, 1.0], [2.0, 6.0, 11.0, 1.0]])  # means 2, 5, 10, 1
    jigsaw_norms = torch.tensor([[1.0, 1.0, 4.0, 2.0], [1.0, 1.0, 6.0, 2.0], [1.0, 1.0, 5.0, 2.0]])  # 1, 1, 5, 2
    scorer = FeatureNormScorer()
    assert scorer.needs_block_norms is True
    fit(scorer, torch.zeros(2, 8), torch.tensor([0, 1]), block_norms=support_norms,
               jigsaw_block_norms=jigsaw_norms)
    assert scorer.selected_block == 1
    assert torch.allclose(scorer.norm_ratios, torch.tensor([2.0, 5.0, 2.0, 0.5], dtype=torch.float64))
    target_norms = torch.tensor([[0.1, 0.7, 0.3, 0.2], [0.4, 0.2, 0.9, 0.8], [0.5, 1.5, 0.0, 0.1]])
    result = score(scorer, torch.zeros(3, 8), block_norms=target_norms)
    assert torch.equal(result.normality, target_norms[:, 1])
    assert result.pred is None


def test_featurenorm_requires_block_norms():
    scorer = FeatureNormScorer()
    with pytest.raises(ValueError, match="featurenorm needs jigsaw block_norms"):
        fit(scorer, torch.zeros(2, 8), torch.tensor([0, 1]), block_norms=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"featurenorm needs block_norms \(support\)"):
        fit(scorer, torch.zeros(2, 8), torch.tensor([0, 1]))
    fit(scorer, torch.zeros(2, 8), torch.tensor([0, 1]), block_norms=torch.ones(2, 4),
        jigsaw_block_norms=torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"featurenorm needs block_norms \(scored\)"):
        score(scorer, torch.zeros(3, 8))
    with pytest.raises(ValueError, match="3 blocks but fit saw 4"):
        score(scorer, torch.zeros(3, 8), block_norms=torch.ones(3, 3))


def test_linear_probe_is_deterministic():
    support, support_labels, targets, _, _ = gaussian_problem(n_support=8)
    results = []
    for _ in range(2):
        scorer = LinearProbeScorer()
        fit(scorer, support, support_labels)
        results.append(score(scorer, targets))
    assert torch.equal(results[0].normality, results[1].normality)
    assert torch.all((results[0].normality > 0) & (results[0].normality <= 1))


def test_registry_builds_every_baseline():
    for name in BASELINES:
        assert name in SCORERS
        scorer = build_scorer(name)
        assert scorer.name == name and not scorer.needs_pair_logits
        assert scorer.needs_block_norms == (name == "featurenorm")
    assert build_scorer("knn", {"NNK": 4}).k == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", FEATURE_SCORERS)
def test_cuda_results_stay_on_device(name):
    support, support_labels, targets, is_known, _ = gaussian_problem()
    cpu = fit_and_score(name, support, support_labels, targets, is_known)
    gpu = fit_and_score(name, support.cuda(), support_labels.cuda(), targets.cuda(), is_known)
    assert gpu.normality.is_cuda and gpu.pred.is_cuda
    assert torch.allclose(gpu.normality.cpu(), cpu.normality, atol=1e-4)


def tiles_of(image, grid):
    """The grid x grid tiles of a [C, H, W] image, row-major."""
    th, tw = image.shape[1] // grid, image.shape[2] // grid
    return [image[:, r * th:(r + 1) * th, c * tw:(c + 1) * tw] for r in range(grid) for c in range(grid)]


def test_jigsaw_permutes_tiles_and_keeps_border():
    # 3 x 14 x 17: tiles of 4 x 5 over the 12 x 15 region, two border rows and columns left alone.
    image = torch.arange(3 * 14 * 17, dtype=torch.float32).reshape(3, 14, 17)
    out = jigsaw_shuffle(image, 3, torch.Generator().manual_seed(0))
    assert out.shape == image.shape
    assert torch.equal(out[:, 12:, :], image[:, 12:, :]) and torch.equal(out[:, :, 15:], image[:, :, 15:])
    assert torch.equal(out.flatten().sort().values, image.flatten().sort().values)
    before, after = tiles_of(image, 3), tiles_of(out, 3)
    source = [next(j for j, tile in enumerate(before) if torch.equal(tile, moved)) for moved in after]
    assert sorted(source) == list(range(9))
    assert source != list(range(9))


def test_jigsaw_is_deterministic_and_never_identity():
    image = torch.rand(2, 3, 9, 9, generator=torch.Generator().manual_seed(5))
    first = jigsaw_shuffle(image, 3, torch.Generator().manual_seed(7))
    second = jigsaw_shuffle(image, 3, torch.Generator().manual_seed(7))
    assert torch.equal(first, second)
    # With 2 x 2 tiles the identity has probability 1/24 per draw: 200 draws would surely hit it.
    small = torch.arange(4.0).reshape(1, 2, 2)
    g = torch.Generator().manual_seed(0)
    assert all(not torch.equal(jigsaw_shuffle(small, 2, g), small) for _ in range(200))
    with pytest.raises(ValueError, match="grid"):
        jigsaw_shuffle(image, 1)


def test_jigsaw_transform_depends_only_on_seed_and_image():
    def to_tensor(img):
        return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)) for _ in range(3)]
    transform = JigsawTransform(to_tensor, seed=3)
    first = [transform(img) for img in images]
    # Different call order and a fresh instance (as in another DataLoader worker) give the same output.
    again = [JigsawTransform(to_tensor, seed=3)(img) for img in reversed(images)][::-1]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert all(not torch.equal(out, to_tensor(img)) for out, img in zip(first, images))
    other_seed = [JigsawTransform(to_tensor, seed=4)(img) for img in images]
    assert any(not torch.equal(a, b) for a, b in zip(first, other_seed))
