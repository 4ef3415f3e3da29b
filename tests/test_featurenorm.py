"""FeatureNorm (evaluation/scorers/featurenorm.py): the selected block and normality from the formula, exact errors.

Yu et al., CVPR 2023: NormRatio[b] = mean over the support images of FeatureNorm[b] / the same mean
over their jigsaw-shuffled versions; the block with the largest ratio is selected, and a scored
image's normality is its FeatureNorm at that block. The references below are plain numpy.
"""
import re

import numpy as np
import pytest
import torch

from evaluation.scorers import SCORERS, FeatureBatch, ScoringInputs, build_scorer
from evaluation.scorers.featurenorm import FeatureNormScorer, check_block_norms


def fit(scorer, support_norms, jigsaw_norms, n_support=None, dim=3):
    """Fit on a support set of n_support rows (default: as many as support_norms has) in two classes."""
    n = support_norms.shape[0] if n_support is None and support_norms is not None else (n_support or 2)
    labels = torch.arange(n) % 2
    jigsaw = None if jigsaw_norms is False else FeatureBatch(torch.zeros(3, dim), block_norms=jigsaw_norms)
    scorer.fit(ScoringInputs(FeatureBatch(torch.zeros(n, dim), labels, block_norms=support_norms), jigsaw=jigsaw))
    return scorer


def score(scorer, norms, n=None, dim=3):
    n = norms.shape[0] if n is None else n
    return scorer.score(FeatureBatch(torch.zeros(n, dim), block_norms=norms))


def test_registered_as_featurenorm_and_needs_block_norms_not_pair_logits():
    # --scorers featurenorm builds it; the evaluation then captures the block norms of the support,
    # jigsaw-shuffled support and scored images, and --backbone_only keeps it (no pair logits).
    assert type(build_scorer("featurenorm")) is FeatureNormScorer
    assert SCORERS["featurenorm"].needs_block_norms is True and SCORERS["featurenorm"].needs_pair_logits is False


def test_selected_block_ratios_and_normality_follow_the_formula():
    rng = np.random.default_rng(0)
    support = rng.uniform(0.5, 3.0, size=(6, 5)).astype(np.float32)
    jigsaw = rng.uniform(0.5, 3.0, size=(4, 5)).astype(np.float32)
    support[:, 3] *= 2.5  # block 3 tells originals from shuffled ones best
    scorer = fit(FeatureNormScorer(), torch.from_numpy(support), torch.from_numpy(jigsaw))
    # In float64 from the float32 values (a float32 mean rounds at ~1e-7).
    ratios = support.astype(np.float64).mean(axis=0) / jigsaw.astype(np.float64).mean(axis=0)
    assert scorer.norm_ratios.dtype == torch.float64
    np.testing.assert_allclose(scorer.norm_ratios.numpy(), ratios, rtol=1e-13)
    assert scorer.selected_block == int(np.argmax(ratios)) == 3
    assert scorer.n_blocks == 5
    scored = rng.uniform(0.0, 4.0, size=(7, 5)).astype(np.float32)
    result = score(scorer, torch.from_numpy(scored))
    assert result.pred is None
    assert result.normality.tolist() == scored[:, 3].tolist()
    # A copy: changing the scored block norms afterwards does not change the result.
    norms = torch.from_numpy(scored.copy())
    result = score(scorer, norms)
    norms.zero_()
    assert result.normality.tolist() == scored[:, 3].tolist()


def test_one_block_and_one_jigsaw_row_are_enough():
    scorer = fit(FeatureNormScorer(), torch.tensor([[2.0], [4.0]]), torch.tensor([[1.5]]))
    assert scorer.selected_block == 0 and scorer.norm_ratios.tolist() == [2.0]
    assert score(scorer, torch.tensor([[0.25], [7.0]])).normality.tolist() == [0.25, 7.0]


def test_a_block_whose_jigsaw_norms_average_to_zero_is_refused():
    support = torch.ones(2, 3)
    jigsaw = torch.tensor([[0.5, 0.0, 2.0], [0.5, 0.0, 2.0]])  # block 1 dead; block 0 averages 0.5 (< 1)
    with pytest.raises(ValueError, match=r"^jigsaw block_norms average to zero at block\(s\) \[1\]: "
                                         r"NormRatio undefined$"):
        fit(FeatureNormScorer(), support, jigsaw)
    with pytest.raises(ValueError, match=r"at block\(s\) \[0, 2\]: NormRatio undefined$"):
        fit(FeatureNormScorer(), support, torch.tensor([[0.0, 1.0, 0.0]]))


def test_fit_errors_name_the_problem():
    support = torch.ones(2, 4)
    with pytest.raises(ValueError, match=re.escape(
            "featurenorm needs jigsaw block_norms: a [rows, n_blocks] tensor "
            "(ResNetBackbone.forward(x, return_block_norms=True))")):
        fit(FeatureNormScorer(), support, False)
    with pytest.raises(ValueError, match=re.escape("featurenorm needs jigsaw block_norms:")):
        fit(FeatureNormScorer(), support, None)
    with pytest.raises(ValueError, match=re.escape("featurenorm needs block_norms (support): a [rows, n_blocks]")):
        fit(FeatureNormScorer(), None, torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"^block_norms \(support\) has 2 rows but there are 5 features$"):
        fit(FeatureNormScorer(), support, torch.ones(3, 4), n_support=5)
    with pytest.raises(ValueError, match=r"^jigsaw block_norms has 3 blocks but block_norms has 4$"):
        fit(FeatureNormScorer(), support, torch.ones(3, 3))
    with pytest.raises(ValueError, match=r"^jigsaw block_norms is empty$"):
        fit(FeatureNormScorer(), support, torch.ones(0, 4))
    with pytest.raises(ValueError, match=r"^jigsaw block_norms on meta but block_norms on cpu$"):
        fit(FeatureNormScorer(), support, torch.ones(3, 4, device="meta"))


@pytest.mark.parametrize("bad, message", [
    (torch.ones(4), "with shape (4,)"),
    (torch.ones(2, 2, 2), "with shape (2, 2, 2)"),
    (torch.ones(2, 0), "with shape (2, 0)"),
])
def test_block_norms_must_be_a_two_dimensional_tensor_with_blocks(bad, message):
    with pytest.raises(ValueError, match="^" + re.escape(f"jigsaw block_norms must be a [rows, n_blocks] tensor, "
                                                         f"got Tensor {message}") + "$"):
        fit(FeatureNormScorer(), torch.ones(2, 4), bad)
    with pytest.raises(ValueError, match="^" + re.escape(f"what must be a [rows, n_blocks] tensor, "
                                                         f"got Tensor {message}") + "$"):
        check_block_norms(bad, None, "what")


def test_block_norms_that_are_not_a_tensor_are_named_by_type():
    with pytest.raises(ValueError, match=r"^x must be a \[rows, n_blocks\] tensor, got list with shape \(\)$"):
        check_block_norms([[1.0, 2.0]], None, "x")
    with pytest.raises(ValueError, match=r"^x must be a \[rows, n_blocks\] tensor, got ndarray with shape \(1, 2\)$"):
        check_block_norms(np.ones((1, 2)), None, "x")
    ok = torch.ones(3, 2)
    assert check_block_norms(ok, 3, "x") is ok and check_block_norms(ok, None, "x") is ok
    with pytest.raises(ValueError, match=r"^x has 3 rows but there are 4 features$"):
        check_block_norms(ok, 4, "x")
    with pytest.raises(ValueError, match=r"^x has 0 rows but there are 1 features$"):
        check_block_norms(torch.ones(0, 2), 1, "x")


def test_score_errors_name_the_problem():
    scorer = FeatureNormScorer()
    with pytest.raises(RuntimeError, match=r"^FeatureNormScorer\.score called before fit$"):
        score(scorer, torch.ones(3, 4))
    fit(scorer, torch.ones(2, 4), torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"^scored features must be \[M, D\], got shape \(3,\)$"):
        scorer.score(FeatureBatch(torch.zeros(3), block_norms=torch.ones(3, 4)))
    with pytest.raises(ValueError, match=r"^featurenorm needs block_norms \(scored\): a \[rows, n_blocks\]"):
        scorer.score(FeatureBatch(torch.zeros(3, 2)))
    with pytest.raises(ValueError, match=r"^block_norms \(scored\) has 2 rows but there are 3 features$"):
        score(scorer, torch.ones(2, 4), n=3)
    with pytest.raises(ValueError, match=r"^block_norms has 3 blocks but fit saw 4$"):
        score(scorer, torch.ones(3, 3))
