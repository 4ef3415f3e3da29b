"""Post-hoc scorers on the support features' geometry: class-mean distances, cosine prototypes, deep kNN,
Mahalanobis. No relational module; every tensor stays on the device of the features it is given."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from evaluation.scorers.base import (
    FeatureBatch,
    Scorer,
    ScoreResult,
    ScoringInputs,
    check_positive_int,
    check_scored,
    check_support,
    class_means,
    fitted,
    floating,
    hyperparameter,
    register_scorer,
    require_fitted,
)
from utils.arg_types import positive_int

# Bounds the [targets, support] similarity block of the kNN scorer (float32: 64 MiB).
KNN_BLOCK_ELEMENTS = 2 ** 24


@register_scorer("prototype_distance", "minus the Euclidean distance to the nearest class mean")
@dataclass
class PrototypeDistanceScorer(Scorer):
    """Normality = minus the Euclidean distance to the nearest class mean; pred = that class."""

    prototypes: Tensor | None = fitted()

    def fit(self, inputs: ScoringInputs) -> None:
        """Prototypes = mean support feature of each class."""
        n_classes = check_support(inputs.support)
        with torch.no_grad():
            self.prototypes = class_means(floating(inputs.support.feats), inputs.support.labels.long(), n_classes)

    def score(self, scored: FeatureBatch) -> ScoreResult:
        """Distances of every scored feature to every prototype; keep the smallest."""
        require_fitted(self, "prototypes")
        check_scored(scored.feats, self.prototypes, "prototypes")
        with torch.no_grad():
            dist = torch.cdist(floating(scored.feats).to(self.prototypes.dtype), self.prototypes)
            nearest, pred = dist.min(dim=1)
            return ScoreResult(normality=-nearest, pred=pred)


@register_scorer("prototype_cosine", "max cosine similarity to the class means (prototype matching as in PAnS)")
@dataclass
class PrototypeCosineScorer(Scorer):
    """Normality = the largest cosine similarity to a class mean; pred = that class."""

    prototypes: Tensor | None = fitted()

    def fit(self, inputs: ScoringInputs) -> None:
        """Prototypes = L2-normalised mean (unnormalised) support feature of each class."""
        n_classes = check_support(inputs.support)
        with torch.no_grad():
            means = class_means(floating(inputs.support.feats), inputs.support.labels.long(), n_classes)
            self.prototypes = F.normalize(means, dim=1)

    def score(self, scored: FeatureBatch) -> ScoreResult:
        """Cosine of every scored feature with every prototype; keep the largest."""
        require_fitted(self, "prototypes")
        check_scored(scored.feats, self.prototypes, "prototypes")
        with torch.no_grad():
            cosine = F.normalize(floating(scored.feats).to(self.prototypes.dtype), dim=1) @ self.prototypes.T
            normality, pred = cosine.max(dim=1)
            return ScoreResult(normality=normality, pred=pred)


@register_scorer("knn", "minus the distance to the --NNK-th nearest support feature, on L2-normalised features")
@dataclass
class KnnDistanceScorer(Scorer):
    """Deep kNN (Sun et al. 2022): minus the distance to the k-th nearest L2-normalised support feature."""

    k: int = hyperparameter(1, "K: prototypes per class or neighbours", flag="NNK",
                            arg_type=positive_int)
    support: Tensor | None = fitted()
    support_labels: Tensor | None = fitted()

    def __post_init__(self) -> None:
        self.k = check_positive_int(self.k, "k")

    def fit(self, inputs: ScoringInputs) -> None:
        """Keep the normalised support set; it must hold at least k samples."""
        check_support(inputs.support)
        if inputs.support.feats.shape[0] < self.k:
            raise ValueError(f"k = {self.k} exceeds the support set size {inputs.support.feats.shape[0]}")
        with torch.no_grad():
            self.support = F.normalize(floating(inputs.support.feats), dim=1)
        self.support_labels = inputs.support.labels.long()

    def score(self, scored: FeatureBatch) -> ScoreResult:
        """k-th largest cosine -> distance sqrt(2 - 2 cos) between unit vectors, in blocks of scored features."""
        require_fitted(self, "support")
        check_scored(scored.feats, self.support, "support features")
        rows = max(1, KNN_BLOCK_ELEMENTS // self.support.shape[0])
        normality, pred = [], []
        with torch.no_grad():
            targets = F.normalize(floating(scored.feats).to(self.support.dtype), dim=1)
            for start in range(0, targets.shape[0], rows):
                cosine = targets[start:start + rows] @ self.support.T
                kth = torch.topk(cosine, self.k, dim=1).values[:, -1]
                normality.append(-torch.sqrt(torch.clamp(2.0 - 2.0 * kth, min=0.0)))
                # argmax (first of tied maxima) keeps the prediction deterministic, unlike topk's order.
                pred.append(self.support_labels[cosine.argmax(dim=1)])
        if not normality:
            return ScoreResult(normality=targets.new_empty(0), pred=self.support_labels.new_empty(0))
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


@register_scorer("mahalanobis", "minus the smallest Mahalanobis distance to a class mean, with one shared "
                                "covariance (Ledoit-Wolf shrinkage, so small support sets work)")
@dataclass
class MahalanobisScorer(Scorer):
    """Class means + one tied Ledoit-Wolf covariance; normality = minus the smallest Mahalanobis distance.

    The covariance is estimated on the support features centred by their own class means (the
    maximum-likelihood 1/N normalisation that Ledoit-Wolf shrinks), so it stays invertible when
    N < D. Everything is computed in float64; normality is float64.
    """

    prototypes: Tensor | None = fitted()
    cholesky: Tensor | None = fitted()
    whitened_prototypes: Tensor | None = fitted()
    shrinkage: float | None = fitted()

    def fit(self, inputs: ScoringInputs) -> None:
        """Class means, tied shrunk covariance, and its Cholesky factor for whitening."""
        n_classes = check_support(inputs.support)
        labels = inputs.support.labels.long()
        with torch.no_grad():
            feats = inputs.support.feats.to(torch.float64)
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

    def score(self, scored: FeatureBatch) -> ScoreResult:
        """Mahalanobis distance of every scored feature to every class mean; keep the smallest."""
        require_fitted(self, "prototypes")
        check_scored(scored.feats, self.prototypes, "class means")
        with torch.no_grad():
            whitened = self._whiten(scored.feats.to(torch.float64))
            # Explicit differences rather than cdist's matmul shortcut: exact in float64 and C is small.
            dist = torch.stack([torch.linalg.vector_norm(whitened - proto, dim=1)
                                for proto in self.whitened_prototypes], dim=1)
            nearest, pred = dist.min(dim=1)
            return ScoreResult(normality=-nearest, pred=pred)
