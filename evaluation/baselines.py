"""Post-hoc baseline novelty scorers on backbone features (no relational module), in the scorer registry.

Importing this module registers: prototype_distance, prototype_cosine, knn, mahalanobis,
featurenorm, linear_probe. Every scorer keeps its tensors on the device of the features it is
given; only linear_probe goes through NumPy (scikit-learn) and puts its results back.

Block-norm extension: a scorer whose class attribute `uses_block_norms` is True (FeatureNorm) needs
the backbone's per-block FeatureNorms. Callers test `getattr(scorer, "uses_block_norms", False)`
and then call
    scorer.fit(support_feats, support_labels, block_norms=[N, n_blocks], jigsaw_block_norms=[J, n_blocks])
    scorer.score(target_feats, block_norms=[M, n_blocks])
where block_norms come from `ResNetBackbone.forward(x, return_block_norms=True)` (or
`extract_features(..., return_block_norms=True).block_norms`) and jigsaw_block_norms from the same
backbone run over the support images through `evaluation.jigsaw.JigsawTransform`.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from evaluation.scorers import (
    ScoreResult,
    Scorer,
    _check_positive_int,
    _check_support,
    _check_targets,
    class_means,
    register_scorer,
)

# Bounds the [targets, support] similarity block of the kNN scorer (float32: 64 MiB).
_KNN_BLOCK_ELEMENTS = 2 ** 24


def _floating(feats: Tensor) -> Tensor:
    """feats as float32 unless already float32/float64 (half precision loses distance accuracy)."""
    return feats if feats.dtype in (torch.float32, torch.float64) else feats.float()


def _require_fitted(scorer: Scorer, attribute: str) -> None:
    """Raise RuntimeError if `scorer.score` is called before `fit` set `attribute`."""
    if getattr(scorer, attribute) is None:
        raise RuntimeError(f"{type(scorer).__name__}.score called before fit")


@register_scorer("prototype_distance")
class PrototypeDistanceScorer(Scorer):
    """Normality = minus the Euclidean distance to the nearest class mean; pred = that class."""

    def __init__(self) -> None:
        self.prototypes: Tensor | None = None

    def fit(self, support_feats: Tensor, support_labels: Tensor) -> None:
        """Prototypes = mean support feature of each class."""
        n_classes = _check_support(support_feats, support_labels)
        with torch.no_grad():
            self.prototypes = class_means(_floating(support_feats), support_labels.long(), n_classes)

    def score(self, target_feats: Tensor) -> ScoreResult:
        """Distances of every target to every prototype; keep the smallest."""
        _require_fitted(self, "prototypes")
        _check_targets(target_feats, self.prototypes, "prototypes")
        with torch.no_grad():
            dist = torch.cdist(_floating(target_feats).to(self.prototypes.dtype), self.prototypes)
            nearest, pred = dist.min(dim=1)
            return ScoreResult(normality=-nearest, pred=pred)


@register_scorer("prototype_cosine")
class PrototypeCosineScorer(Scorer):
    """Normality = the largest cosine similarity to a class mean; pred = that class."""

    def __init__(self) -> None:
        self.prototypes: Tensor | None = None

    def fit(self, support_feats: Tensor, support_labels: Tensor) -> None:
        """Prototypes = L2-normalised mean (unnormalised) support feature of each class."""
        n_classes = _check_support(support_feats, support_labels)
        with torch.no_grad():
            means = class_means(_floating(support_feats), support_labels.long(), n_classes)
            self.prototypes = F.normalize(means, dim=1)

    def score(self, target_feats: Tensor) -> ScoreResult:
        """Cosine of every target with every prototype; keep the largest."""
        _require_fitted(self, "prototypes")
        _check_targets(target_feats, self.prototypes, "prototypes")
        with torch.no_grad():
            cosine = F.normalize(_floating(target_feats).to(self.prototypes.dtype), dim=1) @ self.prototypes.T
            normality, pred = cosine.max(dim=1)
            return ScoreResult(normality=normality, pred=pred)


@register_scorer("knn")
class KnnDistanceScorer(Scorer):
    """Deep kNN (Sun et al. 2022): minus the distance to the k-th nearest L2-normalised support feature."""

    def __init__(self, k: int = 1) -> None:
        self.k = _check_positive_int(k, "k")
        self.support: Tensor | None = None
        self.support_labels: Tensor | None = None

    def fit(self, support_feats: Tensor, support_labels: Tensor) -> None:
        """Keep the normalised support set; it must hold at least k samples."""
        _check_support(support_feats, support_labels)
        if support_feats.shape[0] < self.k:
            raise ValueError(f"k = {self.k} exceeds the support set size {support_feats.shape[0]}")
        with torch.no_grad():
            self.support = F.normalize(_floating(support_feats), dim=1)
        self.support_labels = support_labels.long()

    def score(self, target_feats: Tensor) -> ScoreResult:
        """k-th largest cosine -> distance sqrt(2 - 2 cos) between unit vectors, in target blocks."""
        _require_fitted(self, "support")
        _check_targets(target_feats, self.support, "support features")
        rows = max(1, _KNN_BLOCK_ELEMENTS // self.support.shape[0])
        normality, pred = [], []
        with torch.no_grad():
            targets = F.normalize(_floating(target_feats).to(self.support.dtype), dim=1)
            for start in range(0, targets.shape[0], rows):
                cosine = targets[start:start + rows] @ self.support.T
                kth = torch.topk(cosine, self.k, dim=1).values[:, -1]
                normality.append(-torch.sqrt(torch.clamp(2.0 - 2.0 * kth, min=0.0)))
                # argmax (first of tied maxima) keeps the prediction deterministic, unlike topk's order.
                pred.append(self.support_labels[cosine.argmax(dim=1)])
        if not normality:
            empty = targets.new_empty(0)
            return ScoreResult(normality=empty, pred=self.support_labels.new_empty(0))
        return ScoreResult(normality=torch.cat(normality), pred=torch.cat(pred))


def ledoit_wolf_covariance(centred: Tensor) -> tuple[Tensor, float]:
    """Ledoit-Wolf shrunk covariance of already-centred rows [n, p] and its shrinkage (float64).

    Closed form of Ledoit & Wolf (2004), as in sklearn.covariance.LedoitWolf(assume_centered=True):
    S = X'X / n, mu = tr(S) / p, d2 = ||S - mu I||_F^2 / p,
    b2 = min(d2, (sum_k ||x_k||^4 / n - ||S||_F^2) / (n p)), shrinkage = b2 / d2,
    covariance = (1 - shrinkage) S + shrinkage mu I.
    """
    x = centred.to(torch.float64)
    n, p = x.shape
    emp = x.T @ x / n
    trace = torch.diagonal(emp).sum()
    mu = trace / p
    frob2 = (emp * emp).sum()
    d2 = (frob2 - 2.0 * mu * trace + p * mu * mu) / p
    b2 = ((x * x).sum(dim=1).pow(2).sum() / n - frob2) / (n * p)
    d2_value, b2_value = float(d2), float(b2)
    shrinkage = 0.0 if d2_value <= 0.0 else min(b2_value, d2_value) / d2_value
    covariance = (1.0 - shrinkage) * emp
    covariance.diagonal().add_(shrinkage * mu)
    return covariance, shrinkage


@register_scorer("mahalanobis")
class MahalanobisScorer(Scorer):
    """Class means + one tied Ledoit-Wolf covariance; normality = minus the smallest Mahalanobis distance.

    The covariance is estimated on the support features centred by their own class means (the
    maximum-likelihood 1/N normalisation that Ledoit-Wolf shrinks), so it stays invertible when
    N < D. Everything is computed in float64; normality is float64.
    """

    def __init__(self) -> None:
        self.prototypes: Tensor | None = None
        self.cholesky: Tensor | None = None
        self.whitened_prototypes: Tensor | None = None
        self.shrinkage: float | None = None

    def fit(self, support_feats: Tensor, support_labels: Tensor) -> None:
        """Class means, tied shrunk covariance, and its Cholesky factor for whitening."""
        n_classes = _check_support(support_feats, support_labels)
        labels = support_labels.long()
        with torch.no_grad():
            feats = support_feats.to(torch.float64)
            means = class_means(feats, labels, n_classes)
            residuals = feats - means[labels]
            if not bool(residuals.abs().max() > 0):
                raise ValueError("mahalanobis: the support features do not vary within any class "
                                 "(e.g. one sample per class), so no covariance can be estimated")
            covariance, self.shrinkage = ledoit_wolf_covariance(residuals)
            cholesky, info = torch.linalg.cholesky_ex(covariance)
            if int(info) != 0:
                raise ValueError(f"mahalanobis: the shrunk covariance is not positive definite "
                                 f"(Cholesky failed at column {int(info)}; shrinkage {self.shrinkage:.3g})")
            self.prototypes = means
            self.cholesky = cholesky
            self.whitened_prototypes = self._whiten(means)

    def _whiten(self, feats: Tensor) -> Tensor:
        """Rows L^-1 x, so that Euclidean distances become Mahalanobis distances."""
        return torch.linalg.solve_triangular(self.cholesky, feats.T, upper=False).T

    def score(self, target_feats: Tensor) -> ScoreResult:
        """Mahalanobis distance of every target to every class mean; keep the smallest."""
        _require_fitted(self, "prototypes")
        _check_targets(target_feats, self.prototypes, "class means")
        with torch.no_grad():
            whitened = self._whiten(target_feats.to(torch.float64))
            # Explicit differences rather than cdist's matmul shortcut: exact in float64 and C is small.
            dist = torch.stack([torch.linalg.vector_norm(whitened - proto, dim=1)
                                for proto in self.whitened_prototypes], dim=1)
            nearest, pred = dist.min(dim=1)
            return ScoreResult(normality=-nearest, pred=pred)


def _check_block_norms(block_norms: Tensor | None, n_rows: int | None, what: str) -> Tensor:
    """Validate a [rows, n_blocks] block-norm tensor (rows must equal n_rows unless None)."""
    if block_norms is None:
        raise ValueError(f"featurenorm needs {what}: pass it as a keyword tensor [rows, n_blocks] "
                         f"(ResNetBackbone.forward(x, return_block_norms=True))")
    if not isinstance(block_norms, Tensor) or block_norms.ndim != 2 or block_norms.shape[1] == 0:
        raise ValueError(f"{what} must be a [rows, n_blocks] tensor, got {type(block_norms).__name__} "
                         f"with shape {tuple(getattr(block_norms, 'shape', ()))}")
    if n_rows is not None and block_norms.shape[0] != n_rows:
        raise ValueError(f"{what} has {block_norms.shape[0]} rows but there are {n_rows} features")
    if block_norms.shape[0] == 0:
        raise ValueError(f"{what} is empty")
    return block_norms


@register_scorer("featurenorm")
class FeatureNormScorer(Scorer):
    """FeatureNorm with block selection (Yu et al., CVPR 2023): the norm of the block that best tells
    support images from their jigsaw-shuffled versions.

    NormRatio[b] = mean support FeatureNorm[b] / mean jigsaw-support FeatureNorm[b]; the block with
    the largest ratio is selected (attributes `selected_block`, `norm_ratios` after fit) and a
    target's normality is its FeatureNorm at that block. No class prediction.
    """

    uses_block_norms = True

    def __init__(self) -> None:
        self.selected_block: int | None = None
        self.norm_ratios: Tensor | None = None
        self.n_blocks: int | None = None

    def fit(self, support_feats: Tensor, support_labels: Tensor, block_norms: Tensor | None = None,
            jigsaw_block_norms: Tensor | None = None) -> None:
        """Select the block with the largest support / jigsaw-support mean FeatureNorm ratio."""
        _check_support(support_feats, support_labels)
        support = _check_block_norms(block_norms, support_feats.shape[0], "block_norms (support)")
        jigsaw = _check_block_norms(jigsaw_block_norms, None, "jigsaw_block_norms")
        if jigsaw.shape[1] != support.shape[1]:
            raise ValueError(f"jigsaw_block_norms has {jigsaw.shape[1]} blocks but block_norms has "
                             f"{support.shape[1]}")
        if jigsaw.device != support.device:
            raise ValueError(f"jigsaw_block_norms on {jigsaw.device} but block_norms on {support.device}")
        with torch.no_grad():
            jigsaw_mean = jigsaw.to(torch.float64).mean(dim=0)
            if not bool((jigsaw_mean > 0).all()):
                dead = torch.nonzero(jigsaw_mean <= 0).flatten().tolist()
                raise ValueError(f"jigsaw_block_norms average to zero at block(s) {dead}: NormRatio undefined")
            self.norm_ratios = support.to(torch.float64).mean(dim=0) / jigsaw_mean
            self.selected_block = int(torch.argmax(self.norm_ratios))
        self.n_blocks = support.shape[1]

    def score(self, target_feats: Tensor, block_norms: Tensor | None = None) -> ScoreResult:
        """Normality = the targets' FeatureNorm at the selected block."""
        _require_fitted(self, "norm_ratios")
        if target_feats.ndim != 2:
            raise ValueError(f"target_feats must be [M, D], got shape {tuple(target_feats.shape)}")
        norms = _check_block_norms(block_norms, target_feats.shape[0], "block_norms (targets)")
        if norms.shape[1] != self.n_blocks:
            raise ValueError(f"block_norms has {norms.shape[1]} blocks but fit saw {self.n_blocks}")
        return ScoreResult(normality=norms[:, self.selected_block].clone(), pred=None)


@register_scorer("linear_probe")
class LinearProbeScorer(Scorer):
    """Maximum softmax probability of a logistic regression fitted on the standardised support features."""

    def __init__(self, max_iter: int = 1000) -> None:
        self.max_iter = _check_positive_int(max_iter, "max_iter")
        self.pipeline = None
        self.feat_dim: int | None = None

    def fit(self, support_feats: Tensor, support_labels: Tensor) -> None:
        """StandardScaler + LogisticRegression(lbfgs); needs at least two classes."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        n_classes = _check_support(support_feats, support_labels)
        if n_classes < 2:
            raise ValueError("linear_probe needs at least two support classes, got one")
        feats = support_feats.detach().to(torch.float64).cpu().numpy()
        labels = support_labels.detach().long().cpu().numpy()
        # lbfgs has no randomness, so the probe is deterministic for given features.
        self.pipeline = make_pipeline(StandardScaler(),
                                      LogisticRegression(solver="lbfgs", max_iter=self.max_iter))
        self.pipeline.fit(feats, labels)
        self.feat_dim = support_feats.shape[1]

    def score(self, target_feats: Tensor) -> ScoreResult:
        """Class probabilities of every target; normality = max, pred = argmax."""
        _require_fitted(self, "pipeline")
        if target_feats.ndim != 2 or target_feats.shape[1] != self.feat_dim:
            raise ValueError(f"target_feats must be [M, {self.feat_dim}], got {tuple(target_feats.shape)}")
        if target_feats.shape[0] == 0:
            return ScoreResult(normality=target_feats.new_empty(0, dtype=torch.float64),
                               pred=torch.empty(0, dtype=torch.long, device=target_feats.device))
        proba = self.pipeline.predict_proba(target_feats.detach().to(torch.float64).cpu().numpy())
        # Labels are contiguous 0..C-1, so column j of predict_proba is class j (classes_ is sorted).
        normality = torch.from_numpy(proba.max(axis=1)).to(target_feats.device)
        pred = torch.from_numpy(proba.argmax(axis=1).astype(np.int64)).to(target_feats.device)
        return ScoreResult(normality=normality, pred=pred)
