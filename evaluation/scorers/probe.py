"""A classifier fitted on the support features: the linear probe's maximum class probability."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from evaluation.scorers.base import (
    FeatureBatch,
    Scorer,
    ScoreResult,
    ScoringInputs,
    check_positive_int,
    check_support,
    fitted,
    hyperparameter,
    register_scorer,
    require_fitted,
)
from utils.arg_types import positive_int


@register_scorer("linear_probe", "max class probability of a logistic regression on the support features")
@dataclass
class LinearProbeScorer(Scorer):
    """Maximum softmax probability of a logistic regression fitted on the standardised support features."""

    max_iter: int = hyperparameter(1000, "L-BFGS iterations of the logistic regression", arg_type=positive_int)
    pipeline: Any = fitted()
    feat_dim: int | None = fitted()

    def __post_init__(self) -> None:
        self.max_iter = check_positive_int(self.max_iter, "max_iter")

    def fit(self, inputs: ScoringInputs) -> None:
        """StandardScaler + LogisticRegression(lbfgs); needs at least two classes."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        n_classes = check_support(inputs.support)
        if n_classes < 2:
            raise ValueError("linear_probe needs at least two support classes, got one")
        feats = inputs.support.feats.detach().to(torch.float64).cpu().numpy()
        labels = inputs.support.labels.detach().long().cpu().numpy()
        # lbfgs has no randomness, so the probe is deterministic for given features.
        self.pipeline = make_pipeline(StandardScaler(), LogisticRegression(solver="lbfgs", max_iter=self.max_iter))
        self.pipeline.fit(feats, labels)
        self.feat_dim = inputs.support.feats.shape[1]

    def score(self, scored: FeatureBatch) -> ScoreResult:
        """Class probabilities of every scored feature; normality = max, pred = argmax."""
        require_fitted(self, "pipeline")
        feats = scored.feats
        if feats.ndim != 2 or feats.shape[1] != self.feat_dim:
            raise ValueError(f"scored features must be [M, {self.feat_dim}], got {tuple(feats.shape)}")
        if feats.shape[0] == 0:
            return ScoreResult(normality=feats.new_empty(0, dtype=torch.float64),
                               pred=torch.empty(0, dtype=torch.long, device=feats.device))
        proba = self.pipeline.predict_proba(feats.detach().to(torch.float64).cpu().numpy())
        # Labels are contiguous 0..C-1, so column j of predict_proba is class j (classes_ is sorted).
        normality = torch.from_numpy(proba.max(axis=1)).to(feats.device)
        pred = torch.from_numpy(proba.argmax(axis=1).astype(np.int64)).to(feats.device)
        return ScoreResult(normality=normality, pred=pred)
