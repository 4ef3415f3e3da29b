"""Tests for evaluation.scorers: argument order, chunking, prototypes, selection, kNN, registry."""
import argparse
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from evaluation.evaluate import few_shot_indices
from evaluation.metrics import compute_metrics
from evaluation.scorers import (
    SCORERS,
    FeatureBatch,
    Scorer,
    ScoreResult,
    ScoringInputs,
    build_scorer,
    register_scorer,
)
from evaluation.scorers import resend as resend_module
from evaluation.scorers.base import DEFAULT_PAIR_CHUNK, hyperparameter, scorer_flags
from evaluation.scorers.resend import (
    KnnRelationalScorer,
    MostSignificantPrototypesScorer,
    RelationalPrototypeScorer,
    farthest_point_indices,
    pairwise_similarity,
    resend_similarity,
)
from tests.authors_reference import (
    reference_coreset,
    reference_knn,
    reference_most_significant,
    reference_resend,
)


class bind:
    """A ReSeND scorer with its pair logits bound, fitted and scored on plain tensors (as the engine does)."""

    def __init__(self, cls, pair_logits, chunk_size=DEFAULT_PAIR_CHUNK, **hyper):
        self.scorer = cls(**hyper)
        self.pair_logits = pair_logits
        self.chunk_size = chunk_size

    def fit(self, feats, labels):
        self.scorer.fit(ScoringInputs(FeatureBatch(feats, labels), pair_logits=self.pair_logits,
                                      pair_chunk=self.chunk_size))
        return self

    def score(self, feats):
        return self.scorer.score(FeatureBatch(feats))

    def __getattr__(self, name):
        return getattr(self.scorer, name)


def neg_euclidean(a, b):
    """Symmetric hand-made similarity: higher when closer."""
    return -torch.linalg.vector_norm(a - b, dim=1)


def asymmetric(a, b):
    """Similarity whose value changes if the arguments are swapped."""
    return -((a - b) ** 2).sum(dim=1) + 0.3 * a.sum(dim=1) - 0.1 * b[:, 0]


def l2_head(similarity):
    """Raw L2-head logits [B, 1] whose authors' score (-logit) is `similarity`."""
    return lambda a, b: -similarity(a, b).unsqueeze(1)


class RecordingLogits:
    """L2-head logits of a similarity, recording every (feat_a, feat_b) batch it receives."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = []

    def __call__(self, a, b):
        self.calls.append((a.clone(), b.clone()))
        return -self.fn(a, b).unsqueeze(1)


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
        lambda: bind(RelationalPrototypeScorer, l2_head(neg_euclidean)),
        lambda: bind(MostSignificantPrototypesScorer, l2_head(neg_euclidean), k=3),
        lambda: bind(KnnRelationalScorer, l2_head(neg_euclidean), k=5),
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
    sim = RecordingLogits(asymmetric)
    scorer = bind(RelationalPrototypeScorer, sim, chunk_size=5)
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
    assert torch.allclose(result.extra["max_logit"], expected_sim.max(dim=1).values)


@pytest.mark.parametrize(
    "make",
    [
        lambda sim, cs: bind(RelationalPrototypeScorer, sim, chunk_size=cs),
        lambda sim, cs: bind(MostSignificantPrototypesScorer, sim, k=4, chunk_size=cs),
        lambda sim, cs: bind(KnnRelationalScorer, sim, k=3, chunk_size=cs),
    ],
    ids=["prototype", "msp", "knn"],
)
def test_small_chunks_give_identical_results(make):
    support, support_labels, targets, _ = gaussian_problem(n_support=6, n_known=3, n_unknown=4)
    results = []
    for chunk_size in (7, 100000):
        sim = RecordingLogits(asymmetric)
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
    scorer = bind(MostSignificantPrototypesScorer, l2_head(lambda a, b: -torch.abs(a - b).squeeze(1)), k=4)
    scorer.fit(values, labels)
    assert scorer.prototype_indices.tolist() == [5, 3, 2, 6, 7, 4, 1]
    assert scorer.prototypes.squeeze(1).tolist() == [5.0, 11.0, 0.0, 7.5, 101.0, 105.0, 100.0]
    assert scorer.prototype_labels.tolist() == [0, 0, 0, 0, 1, 1, 1]
    whole = bind(MostSignificantPrototypesScorer, l2_head(neg_euclidean), k=10)
    whole.fit(values, labels)
    assert whole.prototype_indices.tolist() == [5, 3, 2, 6, 0, 7, 4, 1]
    # Target 7: class 0's best prototype is 7.5 (-0.5), class 1's is 100 (-93).
    # Target 103.5: class 0's best is 11 (-92.5), class 1's is 105 (-1.5).
    # The authors report the max logit (max over classes of each class's best score) ...
    result = scorer.score(torch.tensor([[7.0], [103.5]]))
    assert result.normality.tolist() == [-0.5, -1.5]
    assert result.pred.tolist() == [0, 1]
    # ... and print the max softmax over those per-class scores second.
    expected = torch.softmax(torch.tensor([[-0.5, -93.0], [-92.5, -1.5]]), dim=1).max(dim=1).values
    assert torch.allclose(result.extra["max_softmax"], expected)


def test_knn_mean_of_top_k_on_hand_example():
    support = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0]])
    labels = torch.tensor([0, 0, 0, 1, 1])
    scorer = bind(KnnRelationalScorer, l2_head(lambda a, b: -torch.abs(a - b).squeeze(1)), k=2)
    scorer.fit(support, labels)
    result = scorer.score(torch.tensor([[1.25], [10.75], [6.5]]))
    # 1.25: nearest 1 (-0.25) and 2 (-0.75); 10.75: 11 (-0.25) and 10 (-0.75);
    # 6.5: nearest 10 (-3.5), then 2 and 11 tie at -4.5 -> mean -4.0 either way, label of 10.
    assert torch.allclose(result.normality, torch.tensor([-0.5, -0.5, -4.0]))
    assert result.pred.tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="exceeds the support set size"):
        bind(KnnRelationalScorer, l2_head(neg_euclidean), k=6).fit(support, labels)


def test_outputs_carry_no_gradient_and_stay_on_device():
    support, support_labels, targets, _ = gaussian_problem(n_support=3, n_known=2, n_unknown=2)
    support.requires_grad_(True)
    targets.requires_grad_(True)
    scorer = bind(RelationalPrototypeScorer, l2_head(neg_euclidean))
    scorer.fit(support, support_labels)
    result = scorer.score(targets)
    assert not result.normality.requires_grad
    assert result.normality.device == targets.device and result.pred.device == targets.device


def test_support_and_target_validation():
    feats = torch.randn(6, 4)
    with pytest.raises(ValueError, match=r"missing class\(es\) \[1\]"):
        bind(RelationalPrototypeScorer, l2_head(neg_euclidean)).fit(feats, torch.tensor([0, 0, 2, 2, 3, 3]))
    with pytest.raises(ValueError, match="shape"):
        bind(RelationalPrototypeScorer, l2_head(neg_euclidean)).fit(feats, torch.tensor([0, 1, 2]))
    with pytest.raises(RuntimeError, match="before fit"):
        bind(RelationalPrototypeScorer, l2_head(neg_euclidean)).score(feats)
    scorer = bind(RelationalPrototypeScorer, l2_head(neg_euclidean))
    scorer.fit(feats, torch.tensor([0, 0, 1, 1, 2, 2]))
    with pytest.raises(ValueError, match=r"\[M, 4\]"):
        scorer.score(torch.randn(3, 5))
    three_outputs = bind(RelationalPrototypeScorer, lambda a, b: neg_euclidean(a, b).unsqueeze(1).expand(-1, 3))
    three_outputs.fit(feats, torch.tensor([0, 0, 1, 1, 2, 2]))
    with pytest.raises(ValueError, match=r"\[B, 1\] \(L2 head\) or \[B, 2\] \(CE head\); got shape \(18, 3\)"):
        three_outputs.score(feats)
    too_few_rows = bind(RelationalPrototypeScorer, lambda a, b: l2_head(neg_euclidean)(a, b)[1:])
    too_few_rows.fit(feats, torch.tensor([0, 0, 1, 1, 2, 2]))
    with pytest.raises(ValueError, match=r"shape \(17,\) for a batch of 18 pairs; expected \[B\]"):
        too_few_rows.score(feats)
    with pytest.raises(ValueError, match="pair_chunk must be a positive integer, got 0"):
        bind(RelationalPrototypeScorer, l2_head(neg_euclidean), chunk_size=0).fit(feats, torch.tensor([0, 0, 1, 1, 2, 2]))
    with pytest.raises(ValueError, match="k must be a positive integer, got 0"):
        bind(MostSignificantPrototypesScorer, l2_head(neg_euclidean), k=0)
    with pytest.raises(ValueError, match="resend needs the relational module's pair logits"):
        RelationalPrototypeScorer().fit(ScoringInputs(FeatureBatch(feats, torch.tensor([0, 0, 1, 1, 2, 2]))))


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
    assert list(SCORERS)[:3] == ["resend", "resend_msp", "resend_knn"]
    assert SCORERS["resend"] is RelationalPrototypeScorer
    # Hyperparameters come from the flag values given, keyed by flag; other flags are ignored.
    knn = build_scorer("resend_knn", {"NNK": 4, "unrelated": "ignored"})
    assert isinstance(knn, KnnRelationalScorer) and knn.k == 4
    assert build_scorer("resend_knn").k == 1 and build_scorer("resend").name == "resend"
    with pytest.raises(ValueError, match="unknown scorer 'nope'; registered scorers: resend, resend_msp"):
        build_scorer("nope")
    with pytest.raises(ValueError, match="k must be a positive integer, got 0"):
        build_scorer("knn", {"NNK": 0})

    @dataclass
    class PostHoc(Scorer):
        """A baseline with its own flag."""

        shrinkage: float = hyperparameter(0.0, "shrinkage", flag="test_shrinkage")

    monkeypatch.setitem(SCORERS, "dummy_posthoc", PostHoc)
    assert build_scorer("dummy_posthoc", {"test_shrinkage": 0.5, "NNK": 3}).shrinkage == 0.5
    assert scorer_flags()["test_shrinkage"]["scorers"] == ["dummy_posthoc"]
    with pytest.raises(ValueError, match="scorer name 'resend' is already registered"):
        register_scorer("resend", "again")(PostHoc)
    with pytest.raises(TypeError, match="must be a dataclass"):
        register_scorer("not_a_dataclass", "x")(type("Plain", (Scorer,), {}))


def test_relational_scorers_read_nnk_and_need_the_pair_logits():
    # resend_msp and resend_knn both take k from --NNK; --NNK is parsed as an integer >= 1.
    for name, cls in (("resend_msp", MostSignificantPrototypesScorer), ("resend_knn", KnnRelationalScorer)):
        scorer = build_scorer(name, {"NNK": 3})
        assert type(scorer) is cls and scorer.k == 3
    parse = scorer_flags()["NNK"]["arg_type"]
    assert parse("3") == 3
    with pytest.raises(argparse.ArgumentTypeError, match="^must be at least 1, got 0$"):
        parse("0")
    # The three ReSeND scorers need the relational module's pair logits (--backbone_only skips
    # them) and no block norms.
    for name in ("resend", "resend_msp", "resend_knn"):
        assert SCORERS[name].needs_pair_logits is True and SCORERS[name].needs_block_norms is False


def test_scorers_sharing_a_flag_must_share_its_default(monkeypatch):
    @dataclass
    class OtherK(Scorer):
        k: int = hyperparameter(5, "K", flag="NNK")

    monkeypatch.setitem(SCORERS, "other_k", OtherK)
    with pytest.raises(ValueError, match="--NNK: scorer other_k defaults to 5 but"):
        scorer_flags()


def test_resend_similarity_is_the_negated_raw_l2_logit_or_the_ce_same_class_logit():
    l2 = torch.tensor([[0.3], [-2.0], [0.0]])
    assert resend_similarity(l2).tolist() == pytest.approx([-0.3, 2.0, 0.0])
    ce = torch.tensor([[0.5, 1.5], [3.0, -1.0]])
    assert resend_similarity(ce).tolist() == [0.5, 3.0]
    for bad in (torch.zeros(4), torch.zeros(4, 3), torch.zeros(2, 1, 1)):
        with pytest.raises(ValueError, match="must be \\[B, 1\\] \\(L2 head\\) or \\[B, 2\\] \\(CE head\\)"):
            resend_similarity(bad)


def table_logits(table):
    """L2-head pair logits read from table[target id][prototype id]; ids sit in feature column 0."""
    return lambda a, b: torch.tensor([[table[int(x)][int(y)]] for x, y in zip(a[:, 0], b[:, 0])])


def test_raw_and_squashed_logits_rank_targets_differently():
    # Two classes (prototype ids 0 and 1); target 0 is known, target 1 novel. Raw logits:
    # target 0 -> (-3, 0), target 1 -> (-0.2, 0.2). The authors' softmax over -logit gives
    # 0.953 and 0.599 (AUROC 1); over -(2*sigmoid(10*logit) - 1) it would give 0.731 and 0.821
    # (AUROC 0). A regression to the squashed score fails here.
    table = {0: {0: -3.0, 1: 0.0}, 1: {0: -0.2, 1: 0.2}}
    support = torch.tensor([[0.0], [1.0]])
    targets = torch.tensor([[0.0], [1.0]])
    scorer = bind(RelationalPrototypeScorer, table_logits(table))
    scorer.fit(support, torch.tensor([0, 1]))
    result = scorer.score(targets)
    raw = torch.tensor([[3.0, 0.0], [0.2, -0.2]])
    assert torch.allclose(result.normality, torch.softmax(raw, dim=1).max(dim=1).values)
    assert result.normality.tolist() == pytest.approx([0.9526, 0.5987], abs=1e-4)
    metrics = compute_metrics(result.normality.numpy(), np.array([0, 2]), result.pred.numpy(), 2)
    assert metrics["auroc"] == 1.0
    squashed = -(2 * torch.sigmoid(10 * -raw) - 1)
    squashed_normality = torch.softmax(squashed, dim=1).max(dim=1).values.numpy()
    assert compute_metrics(squashed_normality, np.array([0, 2]), None, 2)["auroc"] == 0.0


@pytest.mark.parametrize(
    "make",
    [
        lambda logits: bind(RelationalPrototypeScorer, logits),
        lambda logits: bind(MostSignificantPrototypesScorer, logits, k=2),
        lambda logits: bind(KnnRelationalScorer, logits, k=2),
    ],
    ids=["prototype", "msp", "knn"],
)
def test_ce_head_scores_with_the_same_class_logit(make):
    support, support_labels, targets, _ = gaussian_problem(n_support=4, n_known=2, n_unknown=3)

    def ce_logits(a, b):
        # column 0 "same class", column 1 "different": the score must read column 0 only.
        return torch.stack([neg_euclidean(a, b), 100.0 * torch.randn(a.shape[0])], dim=1)

    torch.manual_seed(0)
    ce = make(ce_logits)
    ce.fit(support, support_labels)
    l2 = make(l2_head(neg_euclidean))
    l2.fit(support, support_labels)
    ce_result, l2_result = ce.score(targets), l2.score(targets)
    assert torch.allclose(ce_result.normality, l2_result.normality)
    assert torch.equal(ce_result.pred, l2_result.pred)


def test_farthest_point_selection_follows_the_authors_float16_and_swap_order():
    # Row 2 (0.0) is nearest the mean and is swapped to the front: the order becomes rows 2, 1, 0.
    # Distances to it: 1000 (row 1) and 1000.2 (row 0). float32 picks row 0; in float16 both
    # round to 1000, and the tie goes to the first row of the swapped order, row 1.
    feats = torch.tensor([[-1000.2], [1000.0], [0.0]])
    assert farthest_point_indices(feats, 2).tolist() == [2, 1]
    assert farthest_point_indices(feats, 2, half_precision=False).tolist() == [2, 0]
    assert farthest_point_indices(feats, 5).tolist() == [2, 1, 0]
    scorer = bind(MostSignificantPrototypesScorer, l2_head(neg_euclidean), k=2)
    scorer.fit(feats, torch.zeros(3, dtype=torch.long))
    assert scorer.prototype_indices.tolist() == [2, 1]


# --- Mutation round 2 (tests/MUTATION.md): exact values, boundaries, messages and devices. ---


def random_relational(a, b):
    """An asymmetric L2-head relational module [B, 1] with spread-out logits (-score = logit)."""
    return (0.3 * ((a - b) ** 2).sum(dim=1) + 0.5 * a[:, 0] - 0.2 * b[:, 1]).unsqueeze(1)


def random_problem(seed=3, n_classes=3, per_class=5, n_targets=7, dim=4):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    support = torch.randn(len(labels), dim, generator=g, dtype=torch.float64) + 2.0 * labels[:, None]
    targets = 2.0 * torch.randn(n_targets, dim, generator=g, dtype=torch.float64)
    return support, labels, targets


def test_scorers_equal_the_authors_reference_on_random_features():
    support, labels, targets = random_problem()
    proto = bind(RelationalPrototypeScorer, random_relational, chunk_size=4).fit(support, labels).score(targets)
    normality, pred = reference_resend(random_relational, support, labels.tolist(), targets, 3)
    # The comparison means something: scores spread and more than one class is predicted.
    assert np.ptp(normality) > 0.1 and len(set(pred.tolist())) >= 2
    np.testing.assert_allclose(proto.normality.numpy(), normality, rtol=1e-12)
    assert proto.pred.tolist() == pred.tolist()
    sims = torch.stack([-random_relational(t.expand(3, -1), torch.stack(
        [support[labels == c].mean(0) for c in range(3)]))[:, 0] for t in targets])
    np.testing.assert_allclose(proto.extra["max_logit"].numpy(), sims.max(dim=1).values.numpy(), rtol=1e-12)

    msp = bind(MostSignificantPrototypesScorer, random_relational, k=3, chunk_size=5).fit(support, labels)
    result = msp.score(targets)
    expected = reference_most_significant(random_relational, support, labels.tolist(), targets, 3, 3)
    assert np.ptp(expected["max_logit"]) > 0.1 and len(set(expected["pred"].tolist())) >= 2
    np.testing.assert_allclose(result.normality.numpy(), expected["max_logit"], rtol=1e-12)
    np.testing.assert_allclose(result.extra["max_softmax"].numpy(), expected["max_softmax"], rtol=1e-12)
    assert result.pred.tolist() == expected["pred"].tolist()
    assert msp.prototypes is msp.references and msp.prototypes.shape == (9, 4)

    for k in (1, 4):
        knn = bind(KnnRelationalScorer, random_relational, k=k, chunk_size=6).fit(support, labels)
        result = knn.score(targets)
        np.testing.assert_allclose(result.normality.numpy(), reference_knn(random_relational, support, targets, k),
                                   rtol=1e-12)
        scores = torch.stack([-random_relational(t.expand(len(support), -1), support)[:, 0] for t in targets])
        assert result.pred.tolist() == labels[scores.argmax(dim=1)].tolist()
        assert len(set(result.pred.tolist())) >= 2
        np.testing.assert_allclose(result.extra["max_logit"].numpy(), scores.max(dim=1).values.numpy(), rtol=1e-12)


def test_msp_class_scores_start_below_every_score():
    # Every score negative: a class's best prototype score must win over any fill value (an
    # initial 0 would make every class score 0).
    support = torch.tensor([[0.0], [1.0], [10.0], [12.0]])
    labels = torch.tensor([0, 0, 1, 1])
    scorer = bind(MostSignificantPrototypesScorer, l2_head(lambda a, b: -torch.abs(a - b).squeeze(1) - 5.0), k=2)
    result = scorer.fit(support, labels).score(torch.tensor([[4.0], [9.0]]))
    # Target 4: class 0 best -3 - 5 = -8, class 1 best -6 - 5 = -11. Target 9: -13 and -6.
    assert result.normality.tolist() == [-8.0, -6.0]
    assert result.pred.tolist() == [0, 1]
    expected = torch.softmax(torch.tensor([[-8.0, -11.0], [-13.0, -6.0]], dtype=torch.float64), dim=1)
    np.testing.assert_allclose(result.extra["max_softmax"].numpy(), expected.max(dim=1).values.numpy(), rtol=1e-6)


def test_relational_scores_carry_no_gradient():
    support, labels, targets = random_problem()
    support.requires_grad_(True)
    targets.requires_grad_(True)
    for cls, hyper in ((RelationalPrototypeScorer, {}), (MostSignificantPrototypesScorer, {"k": 2}),
                       (KnnRelationalScorer, {"k": 2})):
        result = bind(cls, random_relational, **hyper).fit(support, labels).score(targets)
        assert not result.normality.requires_grad, cls.__name__
        assert all(not value.requires_grad for value in result.extra.values()), cls.__name__


@pytest.mark.parametrize("n, k", [(12, 1), (12, 4), (12, 12), (7, 3), (30, 6)])
def test_farthest_point_indices_equal_the_authors_selection(n, k):
    g = torch.Generator().manual_seed(n * 100 + k)
    # Columns on different scales and off-centre: the mean is per column, the distances Euclidean.
    feats = torch.randn(n, 3, generator=g) * torch.tensor([1.0, 4.0, 0.5]) + torch.tensor([3.0, -7.0, 1.0])
    assert farthest_point_indices(feats, k).tolist() == reference_coreset(feats, k)


def test_farthest_point_start_is_nearest_the_column_mean():
    # Column means (0, 10): row 1 (0, 10) is nearest; the mean of all entries (5) is nearest row 2.
    feats = torch.tensor([[-3.0, 10.0], [0.0, 10.0], [5.0, 5.0], [3.0, 15.0], [-5.0, 20.0], [0.0, 0.0]])
    assert farthest_point_indices(feats, 1).tolist() == [1]
    assert farthest_point_indices(feats, 1, half_precision=False).tolist() == [1]
    # Then farthest from row 1: row 4 (distance 11.2); then from {1, 4}: row 5 (10 from row 1).
    assert farthest_point_indices(feats, 3, half_precision=False).tolist() == [1, 4, 5]


@pytest.mark.parametrize("half_precision", [True, False])
def test_farthest_point_never_repeats_a_row_among_duplicates(half_precision):
    # Only duplicates left: each pick is a fresh row (the first one in order), never a repeat.
    feats = torch.full((4, 2), 5.0)
    assert farthest_point_indices(feats, 4, half_precision).tolist() == [0, 1, 2, 3]
    feats = torch.tensor([[1.0], [1.0], [1.0], [9.0]])
    assert farthest_point_indices(feats, 4, half_precision).tolist() == [0, 3, 1, 2]


def test_pairwise_similarity_values_shapes_and_dtype():
    targets = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.25]], dtype=torch.float64)
    references = torch.tensor([[1.0, 0.0], [0.1, 0.7]], dtype=torch.float64)

    def similarity(a, b):
        # float64 values that float32 cannot hold (a float32 output buffer would round them).
        return (a * b).sum(dim=1) / 3.0 + 1e-9

    for chunk_size in (1, 4, 6, 100):
        out = pairwise_similarity(similarity, targets, references, chunk_size)
        expected = torch.tensor([[float((t * r).sum()) / 3.0 + 1e-9 for r in references] for t in targets],
                                dtype=torch.float64)
        assert out.dtype == torch.float64 and out.shape == (3, 2)
        assert torch.equal(out, expected)
    one = pairwise_similarity(similarity, targets[1:2], references[1:], 4)
    assert one.shape == (1, 1) and one.item() == (3.0 * 0.1 - 0.7) / 3.0 + 1e-9
    # No pairs at all: an empty [M, R] matrix in the targets' dtype, and no similarity call.
    calls = []
    for m, r in ((0, 2), (3, 0), (0, 0)):
        empty = pairwise_similarity(lambda a, b: calls.append(1), targets[:m], references[:r], 4)
        assert empty.shape == (m, r) and empty.dtype == torch.float64
    assert calls == []


def test_pairwise_similarity_reports_progress_in_chunks(monkeypatch):
    seen = []

    def recording_progress(iterable, total, desc, unit="it"):
        seen.append((total, desc, unit))
        yield from iterable

    monkeypatch.setattr(resend_module, "progress", recording_progress)
    out = pairwise_similarity(lambda a, b: (a - b).sum(dim=1), torch.ones(5, 2), torch.zeros(3, 2), 4)
    assert out.shape == (5, 3)
    assert seen == [(4, "pairs", "chunk")]  # 15 pairs in chunks of 4
    seen.clear()
    support, labels, targets = random_problem(n_targets=5)
    bind(KnnRelationalScorer, random_relational, k=2, chunk_size=7).fit(support, labels).score(targets)
    assert seen == [(11, "resend_knn: 5 x 15 pairs", "chunk")]  # 75 pairs in chunks of 7


def test_results_stay_on_the_inputs_device_whatever_the_default_device():
    # On a GPU every tensor the scorers create must follow the features, not the default device
    # (the CPU). Here the features are on the CPU and the default device is "meta": a tensor
    # created without the features' device lands there and breaks the computation.
    support, labels, targets = random_problem()
    expected = {}
    for cls, hyper in ((RelationalPrototypeScorer, {}), (MostSignificantPrototypesScorer, {"k": 3}),
                       (KnnRelationalScorer, {"k": 2})):
        expected[cls] = bind(cls, random_relational, chunk_size=4, **hyper).fit(support, labels).score(targets)
    picks = farthest_point_indices(support, 4).tolist()
    duplicates = torch.tensor([[1.0], [1.0], [9.0]])
    with torch.device("meta"):
        for cls, hyper in ((RelationalPrototypeScorer, {}), (MostSignificantPrototypesScorer, {"k": 3}),
                           (KnnRelationalScorer, {"k": 2})):
            result = bind(cls, random_relational, chunk_size=4, **hyper).fit(support, labels).score(targets)
            assert result.normality.device.type == "cpu" and result.pred.device.type == "cpu"
            assert torch.equal(result.normality, expected[cls].normality)
            assert torch.equal(result.pred, expected[cls].pred)
        found = farthest_point_indices(support, 4)
        assert found.device.type == "cpu" and found.tolist() == picks
        for half in (True, False):
            assert farthest_point_indices(duplicates, 3, half).tolist() == [0, 2, 1]
        empty = pairwise_similarity(lambda a, b: a.sum(dim=1), targets[:0], support, 4)
        assert empty.device.type == "cpu" and empty.shape == (0, 15)
        sims = pairwise_similarity(lambda a, b: (a * b).sum(dim=1), targets, support, 4)
        assert sims.device.type == "cpu"
    torch.testing.assert_close(sims, targets @ support.T, rtol=1e-12, atol=1e-12)


def test_knn_accepts_k_equal_to_the_support_size_and_names_both_sizes():
    support = torch.tensor([[0.0, 1.0], [1.0, 1.0], [3.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    scorer = bind(KnnRelationalScorer, l2_head(lambda a, b: -torch.abs(a - b).sum(dim=1)), k=3)
    result = scorer.fit(support, labels).score(torch.tensor([[1.0, 1.0]]))
    assert result.normality.tolist() == [-1.0]  # mean of -1, 0, -2
    assert result.pred.tolist() == [0]
    with pytest.raises(ValueError, match=r"^k = 4 exceeds the support set size 3$"):
        bind(KnnRelationalScorer, l2_head(neg_euclidean), k=4).fit(support, labels)


@pytest.mark.parametrize("cls", [MostSignificantPrototypesScorer, KnnRelationalScorer])
@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_k_must_be_a_positive_integer(cls, bad):
    with pytest.raises(ValueError, match=rf"^k must be a positive integer, got {bad!r}$"):
        cls(k=bad)


def test_relational_scorer_messages():
    feats, labels = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    for cls in (RelationalPrototypeScorer, MostSignificantPrototypesScorer, KnnRelationalScorer):
        with pytest.raises(RuntimeError, match=rf"^{cls.__name__}\.score called before fit$"):
            bind(cls, l2_head(neg_euclidean)).score(feats)
        scorer = bind(cls, l2_head(neg_euclidean)).fit(feats, labels)
        with pytest.raises(ValueError, match=r"^scored features must be \[M, 4\] to match the fitted references, "
                                             r"got \(3, 5\)$"):
            scorer.score(torch.randn(3, 5))
        with pytest.raises(ValueError, match=rf"^{cls.name} needs the relational module's pair logits "
                                             r"\(ScoringInputs\.pair_logits\); --backbone_only evaluates the "
                                             r"post-hoc baselines only$"):
            cls().fit(ScoringInputs(FeatureBatch(feats, labels)))
