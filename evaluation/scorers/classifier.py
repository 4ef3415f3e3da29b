"""Logit-based scorers on a classifier head: energy, max logit, ReAct and ASH-B.

OODDetectionBench runs these on a backbone fine-tuned on the support set, through its `fc` layer. Here
the backbone stays frozen and the head is the linear probe of `linear_probe` (a multinomial logistic
regression on the standardised support features), folded into one affine map of the raw features,
so that ReAct's clipping and ASH's pruning act on the backbone's pooled activations as in the
originals. The four scorers and `linear_probe` share one fit per support set (`fit_standardised_probe`
keeps it in the evaluation's FitCache) and each scorer only changes what is read off the logits. Every scorer's
closed-set prediction is the head's argmax on the unmodified features.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from evaluation.scorers.base import (
    FeatureBatch,
    FitCache,
    Scorer,
    ScoreResult,
    ScoringInputs,
    check_positive_int,
    check_scored,
    check_support,
    fitted,
    hyperparameter,
    register_scorer,
    require_fitted,
)
from evaluation.scorers.probe import fit_standardised_probe
from utils.arg_types import positive_int

def percent(text: str) -> float:
    """argparse type: a percentile in (0, 100)."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < 100:
        raise argparse.ArgumentTypeError(f"must be a percentile in (0, 100), got {text}")
    return value


def check_percent(value: float, what: str) -> float:
    """Return `value` as float if it lies in (0, 100), else raise ValueError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < float(value) < 100:
        raise ValueError(f"{what} must be a percentile in (0, 100), got {value!r}")
    return float(value)


def fit_linear_head(feats: np.ndarray, labels: np.ndarray, max_iter: int,
                    fits: FitCache) -> tuple[np.ndarray, np.ndarray]:
    """(weight [C, D], bias [C]) in float64 of the linear probe folded onto raw features: logits = x W' + b.

    The probe is `linear_probe`'s (the same fitted pipeline, from `fits`: `fit_standardised_probe`). Its
    scaling is folded in (W = coef / scale, b = intercept - W mean). With two classes scikit-learn keeps one decision
    function z; the two logits are then (-z/2, z/2), whose softmax is the probe's (1 - sigmoid(z),
    sigmoid(z)) and whose energy and maximum are symmetric in the two classes.
    """
    pipeline = fit_standardised_probe(feats, labels, max_iter, fits)
    scaler, probe = pipeline[0], pipeline[-1]
    weight = probe.coef_ / scaler.scale_
    bias = probe.intercept_ - weight @ scaler.mean_
    if weight.shape[0] == 1:
        weight = np.concatenate([-weight / 2, weight / 2])
        bias = np.concatenate([-bias / 2, bias / 2])
    return weight, bias


@dataclass
class LinearHeadScorer(Scorer):
    """Base of the logit scorers: the folded linear-probe head, a feature transform and a logit reduction."""

    max_iter: int = hyperparameter(1000, "L-BFGS iterations of the logistic regression", arg_type=positive_int)
    weight: Tensor | None = fitted()
    bias: Tensor | None = fitted()

    def __post_init__(self) -> None:
        self.max_iter = check_positive_int(self.max_iter, "max_iter")

    def fit(self, inputs: ScoringInputs) -> None:
        """Fit (or reuse) the linear-probe head on the support features; needs at least two classes."""
        n_classes = check_support(inputs.support)
        if n_classes < 2:
            raise ValueError(f"{self.name} reads the logits of a classifier of the known classes: it needs at "
                             "least two support classes, got one")
        feats = inputs.support.feats.detach().to(torch.float64)
        weight, bias = fit_linear_head(feats.cpu().numpy(), inputs.support.labels.detach().long().cpu().numpy(),
                                       self.max_iter, inputs.fits)
        self.weight = torch.from_numpy(weight).to(feats.device)
        self.bias = torch.from_numpy(bias).to(feats.device)
        self._fit_transform(feats)

    def _fit_transform(self, support: Tensor) -> None:
        """Learn what the feature transform needs from the support features (float64)."""

    def transform(self, feats: Tensor) -> Tensor:
        """The features the logits of the normality are computed from (identity here)."""
        return feats

    def logits(self, feats: Tensor) -> Tensor:
        """[M, C] head logits of raw features (float64)."""
        return feats.to(torch.float64) @ self.weight.T + self.bias

    def reduce(self, logits: Tensor) -> Tensor:
        """[M] normality from [M, C] logits: the energy score logsumexp (temperature 1)."""
        return torch.logsumexp(logits, dim=1)

    @torch.no_grad()
    def score(self, scored: FeatureBatch) -> ScoreResult:
        """Normality = reduce(logits(transform(x))); pred = argmax logits(x)."""
        require_fitted(self, "weight")
        check_scored(scored.feats, self.weight, "head weights")
        feats = scored.feats.to(torch.float64)
        plain = self.logits(feats)
        return ScoreResult(normality=self.reduce(self.logits(self.transform(feats))), pred=plain.argmax(dim=1))


@register_scorer("energy", "energy score (logsumexp of the logits) of the linear-probe head on the frozen "
                           "features (Liu et al. 2020)")
@dataclass
class EnergyScorer(LinearHeadScorer):
    """Normality = logsumexp of the linear-probe head's logits (minus the free energy at temperature 1)."""


@register_scorer("max_logit", "largest logit of the linear-probe head on the frozen features "
                              "(MLS, Hendrycks et al. 2022)")
@dataclass
class MaxLogitScorer(LinearHeadScorer):
    """Normality = the largest logit of the linear-probe head."""

    def reduce(self, logits: Tensor) -> Tensor:
        return logits.max(dim=1).values


@register_scorer("react", "ReAct (Sun et al. 2021): features clipped at the --react_percentile percentile of "
                          "all support activations, then the energy of the linear-probe head")
@dataclass
class ReActScorer(LinearHeadScorer):
    """Clip every activation at one threshold, the percentile of all support activations; then energy.

    Like ASH-B it shapes activations: it assumes post-ReLU features whose class evidence is spread over
    many units (the backbone's pooled features), not concentrated in a few of the largest ones.
    """

    shapes_activations: ClassVar[bool] = True

    percentile: float = hyperparameter(90.0, "ReAct: percentile of the support activations the features are "
                                             "clipped at", flag="react_percentile", arg_type=percent)
    threshold: float | None = fitted()

    def __post_init__(self) -> None:
        super().__post_init__()
        self.percentile = check_percent(self.percentile, "react percentile")

    def _fit_transform(self, support: Tensor) -> None:
        # numpy's percentile (linear interpolation, as the harness) has no size limit, unlike torch.quantile.
        self.threshold = float(np.percentile(support.cpu().numpy().ravel(), self.percentile))

    def transform(self, feats: Tensor) -> Tensor:
        return feats.clamp(max=self.threshold)


@register_scorer("ash_b", "ASH-B (Djurisic et al. 2023): the top (100 - --ash_percentile) % activations of each "
                          "feature set to the feature's sum over their count, the rest to 0; then the energy "
                          "of the linear-probe head")
@dataclass
class AshBScorer(LinearHeadScorer):
    """ASH-B on the pooled features: keep k = D - round(D p / 100) largest activations, each set to sum(x) / k."""

    shapes_activations: ClassVar[bool] = True

    percentile: float = hyperparameter(65.0, "ASH-B: percentage of each feature's activations pruned to zero",
                                       flag="ash_percentile", arg_type=percent)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.percentile = check_percent(self.percentile, "ash percentile")

    def _fit_transform(self, support: Tensor) -> None:
        dim = support.shape[1]
        if dim - int(np.round(dim * self.percentile / 100.0)) < 1:
            raise ValueError(f"ASH-B at percentile {self.percentile} keeps none of the {dim} activations")

    def transform(self, feats: Tensor) -> Tensor:
        return ash_b(feats, self.percentile)


def ash_b(feats: Tensor, percentile: float) -> Tensor:
    """ASH-B of [M, D] features: the k = D - round(D * percentile / 100) largest entries of each row become the
    row's sum divided by k, every other entry 0. Equal entries are kept in column order (a stable sort),
    so the result does not depend on how a top-k routine breaks ties."""
    dim = feats.shape[1]
    keep = dim - int(np.round(dim * percentile / 100.0))
    if keep < 1:
        raise ValueError(f"ASH-B keeps no activation of {dim} at percentile {percentile}")
    order = torch.sort(feats, dim=1, descending=True, stable=True).indices[:, :keep]
    fill = (feats.sum(dim=1, keepdim=True) / keep).expand(-1, keep)
    return torch.zeros_like(feats).scatter_(1, order, fill)

