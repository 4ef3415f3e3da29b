"""Tests for evaluation.scorers: argument order, chunking, prototypes, selection, kNN, registry."""
import numpy as np
import pytest
import torch

from evaluation.metrics import compute_metrics
from evaluation.scorers import (
    SCORERS,
    KnnRelationalScorer,
    MostSignificantPrototypesScorer,
    RelationalPrototypeScorer,
    Scorer,
    ScoreResult,
    build_scorer,
    few_shot_indices,
    register_scorer,
)


def neg_euclidean(a, b):
    """Symmetric hand-made similarity: higher when closer."""
    return -torch.linalg.vector_norm(a - b, dim=1)


def asymmetric(a, b):
    """Similarity whose value changes if the arguments are swapped."""
    return -((a - b) ** 2).sum(dim=1) + 0.3 * a.sum(dim=1) - 0.1 * b[:, 0]


class RecordingSimilarity:
    """Wraps a similarity and records every (feat_a, feat_b) batch it receives."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = []

    def __call__(self, a, b):
        self.calls.append((a.clone(), b.clone()))
        return self.fn(a, b)


def gaussian_problem(seed=0, dim=8, n_support=20, n_known=30, n_unknown=30):
    """3 well-separated Gaussian classes plus a far unknown cluster."""
    g = torch.Generator().manual_seed(seed)
    centres = 10.0 * torch.eye(dim)[:3]
    support_labels = torch.arange(3).repeat_interleave(n_support)
    support = centres[support_labels] + 0.5 * torch.randn(len(support_labels), dim, generator=g)
    known_labels = torch.arange(3).repeat_interleave(n_known)
    known = centres[known_labels] + 0.5 * torch.randn(len(known_labels), dim, generator=g)
    unknown = 30.0 * torch.eye(dim)[4] + 0.5 * torch.randn(n_unknown, dim, generator=g)
    targets = torch.cat([known, unknown])
    target_labels = torch.cat([known_labels, torch.full((n_unknown,), 3)])
    return support, support_labels, targets, target_labels


@pytest.mark.parametrize(
    "scorer",
    [
        lambda: RelationalPrototypeScorer(neg_euclidean),
        lambda: MostSignificantPrototypesScorer(neg_euclidean, k=3),
        lambda: KnnRelationalScorer(neg_euclidean, k=5),
    ],
    ids=["prototype", "msp", "knn"],
)
def test_separated_classes_are_detected(scorer):
    support, support_labels, targets, target_labels = gaussian_problem()
    s = scorer()
    s.fit(support, support_labels)
    result = s.score(targets)
    assert isinstance(result, ScoreResult)
    assert result.normality.shape == (len(targets),)
    metrics = compute_metrics(result.normality.numpy(), target_labels.numpy(), result.pred.numpy(), 3)
    assert metrics["auroc"] > 0.99
    assert metrics["fpr95"] == 0.0
    assert metrics["closed_set_acc"] == 1.0


def test_prototypes_are_class_means_and_target_goes_first():
    support, support_labels, targets, _ = gaussian_problem(n_support=4, n_known=2, n_unknown=1)
    # Mark targets with a last coordinate of 1 and support with 0 to tell them apart in the calls.
    support[:, -1] = 0.0
    targets[:, -1] = 1.0
    sim = RecordingSimilarity(asymmetric)
    scorer = RelationalPrototypeScorer(sim, chunk_size=5)
    scorer.fit(support, support_labels)
    means = torch.stack([support[support_labels == c].mean(dim=0) for c in range(3)])
    assert torch.allclose(scorer.prototypes, means)
    result = scorer.score(targets)
    assert all(a.shape[0] <= 5 for a, _ in sim.calls)
    firsts = torch.cat([a for a, _ in sim.calls])
    seconds = torch.cat([b for _, b in sim.calls])
    assert torch.all(firsts[:, -1] == 1.0) and torch.all(seconds[:, -1] == 0.0)
    # Every (target, prototype) pair is evaluated exactly once.
    pairs = sorted(
        (int(torch.nonzero((targets == a).all(dim=1))[0]), int(torch.nonzero((means == b).all(dim=1))[0]))
        for a, b in zip(firsts, seconds)
    )
    assert pairs == [(m, c) for m in range(len(targets)) for c in range(3)]
    expected_sim = torch.stack([asymmetric(targets, means[c].expand_as(targets)) for c in range(3)], dim=1)
    probs = torch.softmax(expected_sim, dim=1)
    assert torch.allclose(result.normality, probs.max(dim=1).values)
    assert torch.equal(result.pred, probs.argmax(dim=1))
    assert torch.allclose(result.extra["max_similarity"], expected_sim.max(dim=1).values)


@pytest.mark.parametrize(
    "make",
    [
        lambda sim, cs: RelationalPrototypeScorer(sim, chunk_size=cs),
        lambda sim, cs: MostSignificantPrototypesScorer(sim, k=4, chunk_size=cs),
        lambda sim, cs: KnnRelationalScorer(sim, k=3, chunk_size=cs),
    ],
    ids=["prototype", "msp", "knn"],
)
def test_small_chunks_give_identical_results(make):
    support, support_labels, targets, _ = gaussian_problem(n_support=6, n_known=3, n_unknown=4)
    results = []
    for chunk_size in (7, 100000):
        sim = RecordingSimilarity(asymmetric)
        scorer = make(sim, chunk_size)
        scorer.fit(support, support_labels)
        results.append(scorer.score(targets))
        assert max(a.shape[0] for a, _ in sim.calls) <= chunk_size
    small, big = results
    assert torch.equal(small.normality, big.normality)
    assert torch.equal(small.pred, big.pred)
    assert small.extra.keys() == big.extra.keys()
    for key in small.extra:
        assert torch.equal(small.extra[key], big.extra[key])


def test_farthest_point_selection_on_1d_example():
    # Class 0 at 0, 1, 5, 7.5, 11 (mean 4.9): nearest to mean 5, farthest from it 11, then 0, then
    # 7.5 (min distance 2.5 to {5, 11, 0}; 1 is only 1 away from 0 although 10 away from 11).
    # Class 1 at 100, 101, 105 (mean 102), k larger than the class: 101, then 105, then 100.
    values = torch.tensor([1.0, 100.0, 0.0, 11.0, 105.0, 5.0, 7.5, 101.0]).unsqueeze(1)
    labels = torch.tensor([0, 1, 0, 0, 1, 0, 0, 1])
    scorer = MostSignificantPrototypesScorer(lambda a, b: -torch.abs(a - b).squeeze(1), k=4)
    scorer.fit(values, labels)
    assert scorer.prototype_indices.tolist() == [5, 3, 2, 6, 7, 4, 1]
    assert scorer.prototypes.squeeze(1).tolist() == [5.0, 11.0, 0.0, 7.5, 101.0, 105.0, 100.0]
    assert scorer.prototype_labels.tolist() == [0, 0, 0, 0, 1, 1, 1]
    whole = MostSignificantPrototypesScorer(neg_euclidean, k=10)
    whole.fit(values, labels)
    assert whole.prototype_indices.tolist() == [5, 3, 2, 6, 0, 7, 4, 1]
    # Target 7: class 0's best prototype is 7.5 (-0.5), class 1's is 100 (-93).
    # Target 103.5: class 0's best is 11 (-92.5), class 1's is 105 (-1.5).
    result = scorer.score(torch.tensor([[7.0], [103.5]]))
    assert result.extra["max_logit"].tolist() == [-0.5, -1.5]
    assert result.pred.tolist() == [0, 1]
    expected = torch.softmax(torch.tensor([[-0.5, -93.0], [-92.5, -1.5]]), dim=1).max(dim=1).values
    assert torch.allclose(result.normality, expected)


def test_knn_mean_of_top_k_on_hand_example():
    support = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0]])
    labels = torch.tensor([0, 0, 0, 1, 1])
    scorer = KnnRelationalScorer(lambda a, b: -torch.abs(a - b).squeeze(1), k=2)
    scorer.fit(support, labels)
    result = scorer.score(torch.tensor([[1.25], [10.75], [6.5]]))
    # 1.25: nearest 1 (-0.25) and 2 (-0.75); 10.75: 11 (-0.25) and 10 (-0.75);
    # 6.5: nearest 10 (-3.5), then 2 and 11 tie at -4.5 -> mean -4.0 either way, label of 10.
    assert torch.allclose(result.normality, torch.tensor([-0.5, -0.5, -4.0]))
    assert result.pred.tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="exceeds the support set size"):
        KnnRelationalScorer(neg_euclidean, k=6).fit(support, labels)


def test_outputs_carry_no_gradient_and_stay_on_device():
    support, support_labels, targets, _ = gaussian_problem(n_support=3, n_known=2, n_unknown=2)
    support.requires_grad_(True)
    targets.requires_grad_(True)
    scorer = RelationalPrototypeScorer(neg_euclidean)
    scorer.fit(support, support_labels)
    result = scorer.score(targets)
    assert not result.normality.requires_grad
    assert result.normality.device == targets.device and result.pred.device == targets.device


def test_support_and_target_validation():
    feats = torch.randn(6, 4)
    with pytest.raises(ValueError, match=r"missing class\(es\) \[1\]"):
        RelationalPrototypeScorer(neg_euclidean).fit(feats, torch.tensor([0, 0, 2, 2, 3, 3]))
    with pytest.raises(ValueError, match="shape"):
        RelationalPrototypeScorer(neg_euclidean).fit(feats, torch.tensor([0, 1, 2]))
    with pytest.raises(RuntimeError, match="before fit"):
        RelationalPrototypeScorer(neg_euclidean).score(feats)
    scorer = RelationalPrototypeScorer(neg_euclidean)
    scorer.fit(feats, torch.tensor([0, 0, 1, 1, 2, 2]))
    with pytest.raises(ValueError, match=r"\[M, 4\]"):
        scorer.score(torch.randn(3, 5))
    bad = RelationalPrototypeScorer(lambda a, b: neg_euclidean(a, b).unsqueeze(1))
    bad.fit(feats, torch.tensor([0, 0, 1, 1, 2, 2]))
    with pytest.raises(ValueError, match="expected \\[B\\]"):
        bad.score(feats)
    with pytest.raises(ValueError, match="chunk_size"):
        RelationalPrototypeScorer(neg_euclidean, chunk_size=0)
    with pytest.raises(ValueError, match="k must be"):
        MostSignificantPrototypesScorer(neg_euclidean, k=0)


def test_few_shot_indices_counts_and_determinism():
    labels = np.array([0] * 5 + [1] * 2 + [2] * 8)
    rng = np.random.default_rng(1)
    labels = labels[rng.permutation(len(labels))]
    idx = few_shot_indices(labels, 3, seed=0)
    assert np.all(np.diff(idx) > 0)
    assert np.bincount(labels[idx]).tolist() == [3, 2, 3]
    assert np.array_equal(idx, few_shot_indices(labels, 3, seed=0))
    assert len({tuple(few_shot_indices(labels, 3, seed=s)) for s in range(10)}) > 1
    assert np.array_equal(few_shot_indices(labels, 100, seed=0), np.arange(len(labels)))
    for bad in (0, -2):
        with pytest.raises(ValueError, match="n_per_class"):
            few_shot_indices(labels, bad, seed=0)


def test_registry_and_build_scorer(monkeypatch):
    assert {"resend", "resend_msp", "resend_knn"} <= set(SCORERS)
    assert SCORERS["resend"] is RelationalPrototypeScorer
    context = {"similarity": neg_euclidean, "k": 4, "chunk_size": 7, "unrelated": "ignored"}
    knn = build_scorer("resend_knn", **context)
    assert isinstance(knn, KnnRelationalScorer) and knn.k == 4 and knn.chunk_size == 7
    assert build_scorer("resend", **context).name == "resend"
    with pytest.raises(ValueError, match="resend_knn"):
        build_scorer("nope", **context)
    with pytest.raises(ValueError, match="'k'"):
        build_scorer("resend_msp", similarity=neg_euclidean)

    class PostHoc(Scorer):
        """A baseline that takes no similarity callable."""

        def __init__(self, shrinkage: float = 0.0):
            self.shrinkage = shrinkage

    monkeypatch.setitem(SCORERS, "dummy_posthoc", PostHoc)
    posthoc = build_scorer("dummy_posthoc", shrinkage=0.5, **context)
    assert isinstance(posthoc, PostHoc) and posthoc.shrinkage == 0.5
    with pytest.raises(ValueError, match="already registered"):
        register_scorer("resend")(PostHoc)
