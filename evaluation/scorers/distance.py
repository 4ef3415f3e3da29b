"""Post-hoc scorers on the support features' geometry: class-mean distances, cosine prototypes, deep kNN,
Mahalanobis. No relational module; every tensor stays on the device of the features it is given.

Each scorer reads `--baseline_protocol`: `this` (default) is this project's setting of the method,
`oodbench` the setting of OODDetectionBench (FrancescoCappio/OODDetectionBench, `models/evaluators/`),
the harness the ReSeND paper's baseline tables come from. The `oodbench` branches are written from
that harness's formulas and compute in float64 with explicit differences, so that equal features
give equal scores (ties stay ties).
"""
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
from utils.arg_types import boolean, one_of, positive_int

# Bounds the [targets, support] similarity block of the kNN scorer (float32: 64 MiB).
KNN_BLOCK_ELEMENTS = 2 ** 24

PROTOCOLS = ("this", "oodbench")
PROTOCOL_HELP = ("whose settings the post-hoc baselines use: 'this' (this project's) or 'oodbench' (those of "
                 "OODDetectionBench, the harness of the paper's baseline tables: cosine prototypes of unit "
                 "vectors, kNN with a majority-vote prediction and --knn_normalize, Mahalanobis with the "
                 "empirical covariance's pseudo-inverse, a one-vs-rest liblinear probe with C = 0.316, and an "
                 "interpolated FPR95 column fpr95_interp)")


protocol_choice = one_of(PROTOCOLS)  # argparse type of --baseline_protocol


def check_protocol(value: str) -> str:
    """Return `value` if it is a known protocol, else raise ValueError."""
    if value not in PROTOCOLS:
        raise ValueError(f"baseline_protocol must be one of {', '.join(PROTOCOLS)}, got {value!r}")
    return value


def protocol_field() -> str:
    """The shared --baseline_protocol hyperparameter."""
    return hyperparameter("this", PROTOCOL_HELP, flag="baseline_protocol", arg_type=protocol_choice)


# Bounds the [targets, support] float64 distance block of the oodbench kNN (128 MiB).
EXACT_BLOCK_ELEMENTS = 2 ** 24


def exact_distances(targets: Tensor, references: Tensor) -> Tensor:
    """[M, R] Euclidean distances in float64 from explicit differences (no |x|^2 + |y|^2 - 2xy shortcut)."""
    return torch.cdist(targets.to(torch.float64), references.to(torch.float64),
                       compute_mode="donot_use_mm_for_euclid_dist")


@register_scorer("prototype_distance", "minus the Euclidean distance to the nearest class mean")
@dataclass
class PrototypeDistanceScorer(Scorer):
    """Normality = minus the Euclidean distance to the nearest class mean; pred = that class.

    oodbench: 1 - that distance, in float64 from explicit differences (the same ranking).
    """

    baseline_protocol: str = protocol_field()
    prototypes: Tensor | None = fitted()

    def __post_init__(self) -> None:
        self.baseline_protocol = check_protocol(self.baseline_protocol)

    def fit(self, inputs: ScoringInputs) -> None:
        """Prototypes = mean support feature of each class."""
        n_classes = check_support(inputs.support)
        with torch.no_grad():
            feats = inputs.support.feats.to(torch.float64) if self.baseline_protocol == "oodbench" else \
                floating(inputs.support.feats)
            self.prototypes = class_means(feats, inputs.support.labels.long(), n_classes)

    def score(self, scored: FeatureBatch) -> ScoreResult:
        """Distances of every scored feature to every prototype; keep the smallest."""
        require_fitted(self, "prototypes")
        check_scored(scored.feats, self.prototypes, "prototypes")
        with torch.no_grad():
            if self.baseline_protocol == "oodbench":
                nearest, pred = exact_distances(scored.feats, self.prototypes).min(dim=1)
                return ScoreResult(normality=1.0 - nearest, pred=pred)
            dist = torch.cdist(floating(scored.feats).to(self.prototypes.dtype), self.prototypes)
            nearest, pred = dist.min(dim=1)
            return ScoreResult(normality=-nearest, pred=pred)


@register_scorer("prototype_cosine", "max cosine similarity to the class means (prototype matching as in PAnS)")
@dataclass
class PrototypeCosineScorer(Scorer):
    """Normality = the largest cosine similarity to a class mean; pred = that class.

    this: the class means of the raw features, normalised. oodbench: the class means of the unit
    vectors, normalised (float64).
    """

    baseline_protocol: str = protocol_field()
    prototypes: Tensor | None = fitted()

    def __post_init__(self) -> None:
        self.baseline_protocol = check_protocol(self.baseline_protocol)

    def fit(self, inputs: ScoringInputs) -> None:
        """Prototypes = L2-normalised mean support feature (raw, or unit vectors for oodbench) of each class."""
        n_classes = check_support(inputs.support)
        with torch.no_grad():
            if self.baseline_protocol == "oodbench":
                feats = F.normalize(inputs.support.feats.to(torch.float64), dim=1)
            else:
                feats = floating(inputs.support.feats)
            means = class_means(feats, inputs.support.labels.long(), n_classes)
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
    baseline_protocol: str = protocol_field()
    normalize: bool = hyperparameter(True, "kNN on L2-normalised features (on: knn_ood) or raw ones (off: "
                                           "knn_distance); off needs --baseline_protocol oodbench",
                                     flag="knn_normalize", arg_type=boolean)
    support: Tensor | None = fitted()
    support_labels: Tensor | None = fitted()
    n_classes: int | None = fitted()

    def __post_init__(self) -> None:
        self.k = check_positive_int(self.k, "k")
        self.baseline_protocol = check_protocol(self.baseline_protocol)
        if not isinstance(self.normalize, bool):
            raise ValueError(f"knn normalize must be True or False, got {self.normalize!r}")
        if not self.normalize and self.baseline_protocol != "oodbench":
            raise ValueError("--knn_normalize off (kNN on raw features) is OODDetectionBench's knn_distance: "
                             "give --baseline_protocol oodbench")

    def fit(self, inputs: ScoringInputs) -> None:
        """Keep the (normalised) support set; it must hold at least k samples."""
        self.n_classes = check_support(inputs.support)
        if inputs.support.feats.shape[0] < self.k:
            raise ValueError(f"k = {self.k} exceeds the support set size {inputs.support.feats.shape[0]}")
        with torch.no_grad():
            if self.baseline_protocol == "oodbench":
                feats = inputs.support.feats.to(torch.float64)
                self.support = F.normalize(feats, dim=1) if self.normalize else feats
            else:
                self.support = F.normalize(floating(inputs.support.feats), dim=1)
        self.support_labels = inputs.support.labels.long()

    def score(self, scored: FeatureBatch) -> ScoreResult:
        """k-th largest cosine -> distance sqrt(2 - 2 cos) between unit vectors, in blocks of scored features."""
        require_fitted(self, "support")
        check_scored(scored.feats, self.support, "support features")
        if self.baseline_protocol == "oodbench":
            return self._score_oodbench(scored.feats)
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

    @torch.no_grad()
    def _score_oodbench(self, feats: Tensor) -> ScoreResult:
        """OODDetectionBench's kNN: normality = minus the squared distance to the k-th nearest support
        feature; pred = the most frequent label among the k nearest (ties: the smallest label).

        Distances are float64 from explicit differences; neighbours at equal distance are taken in
        support order, which only the majority vote can see.
        """
        targets = feats.to(torch.float64)
        if self.normalize:
            targets = F.normalize(targets, dim=1)
        rows = max(1, EXACT_BLOCK_ELEMENTS // self.support.shape[0])
        normality, pred = [], []
        for start in range(0, targets.shape[0], rows):
            dist = exact_distances(targets[start:start + rows], self.support)
            order = torch.argsort(dist, dim=1, stable=True)[:, :self.k]
            kth = torch.gather(dist, 1, order[:, -1:]).squeeze(1)
            normality.append(-kth * kth)
            votes = F.one_hot(self.support_labels[order], self.n_classes).sum(dim=1)
            pred.append(votes.argmax(dim=1))  # the first of tied maxima: the smallest label
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

    oodbench (Lee et al. 2018 as OODDetectionBench runs it, without the input step): the empirical
    covariance of the class-centred features (re-centred on their mean, 1/N), its pseudo-inverse
    with scipy's `pinvh` cut-off (eigenvalues above D * eps * the largest), and normality = the
    largest Gaussian score -0.5 (x - mu_c)' P (x - mu_c). Its gradient-sign input step needs the
    backbone: see `oodbench_input_step`.
    """

    baseline_protocol: str = protocol_field()
    prototypes: Tensor | None = fitted()
    cholesky: Tensor | None = fitted()
    whitened_prototypes: Tensor | None = fitted()
    shrinkage: float | None = fitted()
    whitening: Tensor | None = fitted()  # oodbench: [D, r] with P = whitening @ whitening.T

    def __post_init__(self) -> None:
        self.baseline_protocol = check_protocol(self.baseline_protocol)

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
            if self.baseline_protocol == "oodbench":
                self.prototypes = means
                self.whitening = pseudo_inverse_whitening(empirical_covariance(residuals))
                self.whitened_prototypes = means @ self.whitening
                return
            covariance, self.shrinkage = ledoit_wolf_covariance(residuals)
            cholesky, info = torch.linalg.cholesky_ex(covariance)
            if int(info) != 0:
                raise ValueError(f"mahalanobis: the shrunk covariance is not positive definite "
                                 f"(Cholesky failed at column {int(info)}; shrinkage {self.shrinkage:.3g})")
            self.prototypes = means
            self.cholesky = cholesky
            self.whitened_prototypes = self._whiten(means)

    def _whiten(self, feats: Tensor) -> Tensor:
        """Rows L^-1 x (oodbench: x W), so that Euclidean distances become Mahalanobis distances."""
        if self.whitening is not None:
            return feats @ self.whitening
        return torch.linalg.solve_triangular(self.cholesky, feats.T, upper=False).T

    def gaussian_scores(self, feats: Tensor) -> Tensor:
        """[M, C] -0.5 (x - mu_c)' P (x - mu_c) of every feature and class mean (float64)."""
        require_fitted(self, "prototypes")
        check_scored(feats, self.prototypes, "class means")
        whitened = self._whiten(feats.to(torch.float64))
        return torch.stack([-0.5 * torch.linalg.vector_norm(whitened - proto, dim=1).pow(2)
                            for proto in self.whitened_prototypes], dim=1)

    def score(self, scored: FeatureBatch) -> ScoreResult:
        """Mahalanobis distance of every scored feature to every class mean; keep the smallest."""
        require_fitted(self, "prototypes")
        check_scored(scored.feats, self.prototypes, "class means")
        with torch.no_grad():
            if self.baseline_protocol == "oodbench":
                normality, pred = self.gaussian_scores(scored.feats).max(dim=1)
                return ScoreResult(normality=normality, pred=pred)
            whitened = self._whiten(scored.feats.to(torch.float64))
            # Explicit differences rather than cdist's matmul shortcut: exact in float64 and C is small.
            dist = torch.stack([torch.linalg.vector_norm(whitened - proto, dim=1)
                                for proto in self.whitened_prototypes], dim=1)
            nearest, pred = dist.min(dim=1)
            return ScoreResult(normality=-nearest, pred=pred)


def empirical_covariance(centred: Tensor) -> Tensor:
    """sklearn's EmpiricalCovariance(assume_centered=False) of rows [n, p] (float64): the rows are re-centred
    on their mean and the covariance has the maximum-likelihood 1/n normalisation."""
    x = centred.to(torch.float64)
    x = x - x.mean(dim=0)
    return x.T @ x / x.shape[0]


def pseudo_inverse_whitening(covariance: Tensor) -> Tensor:
    """[p, r] W with W W' = pinvh(covariance): eigenvectors over the square root of the eigenvalues kept.

    scipy.linalg.pinvh's default cut-off: eigenvalues with |s| > p * eps(float64) * max|s| are kept, the
    others are treated as zero. Raises when none is kept (a zero covariance).
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance.to(torch.float64))
    largest = eigenvalues.abs().max()
    keep = eigenvalues.abs() > largest * len(covariance) * torch.finfo(torch.float64).eps
    if not bool(keep.any()):
        raise ValueError("mahalanobis (oodbench): the covariance is zero, so its pseudo-inverse is zero too")
    # A kept eigenvalue is positive: the covariance is positive semi-definite and negative ones are
    # rounding noise, far below the cut-off.
    return eigenvectors[:, keep] / torch.sqrt(eigenvalues[keep].abs())


def oodbench_input_step(backbone: torch.nn.Module, images: Tensor, scorer: MahalanobisScorer,
                        epsilon: float = 0.001, channel_std: tuple[float, float, float] = (0.2023, 0.1994, 0.2010)
                        ) -> Tensor:
    """Features of `images` after OODDetectionBench's Mahalanobis input pre-processing (Lee et al. 2018).

    The scored image moves one step of size `epsilon` against the sign of the gradient of its
    Mahalanobis distance to its nearest class mean (0.5 (x - mu)' P (x - mu) of the features; a zero
    gradient counts as positive), the step divided per channel by `channel_std` (the harness's
    "resnet" constants), and the returned features [B, D] of the moved images are what a fitted
    `mahalanobis` scorer then scores. It needs the backbone's input gradients, so the evaluation
    engine (which scores cached features) does not run it; this function is for a caller holding
    the backbone and the image tensors. `scorer` must be fitted with --baseline_protocol oodbench.
    """
    if scorer.whitening is None:
        raise ValueError("oodbench_input_step needs a mahalanobis scorer fitted with baseline_protocol='oodbench'")
    if images.ndim != 4 or images.shape[1] != len(channel_std):
        raise ValueError(f"images must be [B, {len(channel_std)}, H, W], got {tuple(images.shape)}")
    pixels = images.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        feats = backbone(pixels)
        whitened = feats.to(torch.float64) @ scorer.whitening
        nearest = (whitened[:, None, :] - scorer.whitened_prototypes[None]).pow(2).sum(dim=2).argmin(dim=1)
        loss = (0.5 * (whitened - scorer.whitened_prototypes[nearest]).pow(2).sum(dim=1)).mean()
        (gradient,) = torch.autograd.grad(loss, pixels)
    step = (gradient >= 0).to(images.dtype) * 2.0 - 1.0
    step = step / torch.tensor(channel_std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    with torch.no_grad():
        return backbone(images.detach() - epsilon * step)
