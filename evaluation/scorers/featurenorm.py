"""FeatureNorm (Yu et al., CVPR 2023): the norm of the backbone block that best tells support images from
their jigsaw-shuffled versions. Declares `needs_block_norms`: the engine captures every block's norm
in the same forward pass as the features, for the support, jigsaw-shuffled support and scored sets."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from evaluation.scorers.base import (
    FeatureBatch,
    Scorer,
    ScoreResult,
    ScoringInputs,
    check_support,
    fitted,
    register_scorer,
    require_fitted,
)


def check_block_norms(block_norms: Tensor | None, n_rows: int | None, what: str) -> Tensor:
    """Validate a [rows, n_blocks] block-norm tensor (rows must equal n_rows unless None)."""
    if block_norms is None:
        raise ValueError(f"featurenorm needs {what}: a [rows, n_blocks] tensor "
                         f"(ResNetBackbone.forward(x, return_block_norms=True))")
    if not isinstance(block_norms, Tensor) or block_norms.ndim != 2 or block_norms.shape[1] == 0:
        raise ValueError(f"{what} must be a [rows, n_blocks] tensor, got {type(block_norms).__name__} "
                         f"with shape {tuple(getattr(block_norms, 'shape', ()))}")
    if n_rows is not None and block_norms.shape[0] != n_rows:
        raise ValueError(f"{what} has {block_norms.shape[0]} rows but there are {n_rows} features")
    if block_norms.shape[0] == 0:
        raise ValueError(f"{what} is empty")
    return block_norms


@register_scorer("featurenorm", "FeatureNorm (Yu et al., CVPR 2023): the norm of the backbone block whose "
                                "support/jigsaw-shuffled-support norm ratio is largest")
@dataclass
class FeatureNormScorer(Scorer):
    """NormRatio[b] = mean support FeatureNorm[b] / mean jigsaw-support FeatureNorm[b]; the block with the
    largest ratio is selected (`selected_block`, `norm_ratios` after fit) and a scored image's normality is
    its FeatureNorm at that block. No class prediction."""

    needs_block_norms = True
    selected_block: int | None = fitted()
    norm_ratios: Tensor | None = fitted()
    n_blocks: int | None = fitted()

    def fit(self, inputs: ScoringInputs) -> None:
        """Select the block with the largest support / jigsaw-support mean FeatureNorm ratio."""
        check_support(inputs.support)
        support = check_block_norms(inputs.support.block_norms, inputs.support.feats.shape[0],
                                    "block_norms (support)")
        jigsaw = check_block_norms(None if inputs.jigsaw is None else inputs.jigsaw.block_norms, None,
                                   "jigsaw block_norms")
        if jigsaw.shape[1] != support.shape[1]:
            raise ValueError(f"jigsaw block_norms has {jigsaw.shape[1]} blocks but block_norms has {support.shape[1]}")
        if jigsaw.device != support.device:
            raise ValueError(f"jigsaw block_norms on {jigsaw.device} but block_norms on {support.device}")
        with torch.no_grad():
            jigsaw_mean = jigsaw.to(torch.float64).mean(dim=0)
            if not bool((jigsaw_mean > 0).all()):
                dead = torch.nonzero(jigsaw_mean <= 0).flatten().tolist()
                raise ValueError(f"jigsaw block_norms average to zero at block(s) {dead}: NormRatio undefined")
            self.norm_ratios = support.to(torch.float64).mean(dim=0) / jigsaw_mean
            self.selected_block = int(torch.argmax(self.norm_ratios))
        self.n_blocks = support.shape[1]

    def score(self, scored: FeatureBatch) -> ScoreResult:
        """Normality = the scored images' FeatureNorm at the selected block."""
        require_fitted(self, "norm_ratios")
        if scored.feats.ndim != 2:
            raise ValueError(f"scored features must be [M, D], got shape {tuple(scored.feats.shape)}")
        norms = check_block_norms(scored.block_norms, scored.feats.shape[0], "block_norms (scored)")
        if norms.shape[1] != self.n_blocks:
            raise ValueError(f"block_norms has {norms.shape[1]} blocks but fit saw {self.n_blocks}")
        return ScoreResult(normality=norms[:, self.selected_block].clone(), pred=None)
