"""A classifier fitted on the support features: the linear probe's maximum class probability.

`--baseline_protocol oodbench` fits OODDetectionBench's probe instead: one-vs-rest logistic regressions
(liblinear, C = 0.316, random_state 0) on the raw features, scored by the largest of their sigmoids
normalised to sum to one (its `LogisticRegression(solver="liblinear")`, which scikit-learn >= 1.8
refuses for 3+ classes; `OneVsRestClassifier` computes the same probabilities).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from evaluation.scorers.distance import check_protocol, protocol_field
from evaluation.scorers.base import (
    FeatureBatch,
    FitCache,
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

def _digest(feats: np.ndarray, labels: np.ndarray) -> str:
    """A digest of a support set's features and labels (identifies it in the evaluation's FitCache)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str(feats.shape).encode())
    h.update(np.ascontiguousarray(feats).tobytes())
    h.update(np.ascontiguousarray(labels).tobytes())
    return h.hexdigest()


def fit_standardised_probe(feats: np.ndarray, labels: np.ndarray, max_iter: int, fits: FitCache) -> Any:
    """StandardScaler + LogisticRegression(lbfgs, max_iter) fitted on float64 support features and labels.

    `fits` (the evaluation's) keeps the pipeline for the same support set and max_iter: `--evaluator all`
    fits it once for linear_probe and the logit scorers on its head (energy, max_logit, react, ash_b).
    It is not modified after the fit; lbfgs has no randomness, so reusing it changes no score.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def fit() -> Any:
        pipeline = make_pipeline(StandardScaler(), LogisticRegression(solver="lbfgs", max_iter=max_iter))
        return pipeline.fit(feats, labels)

    return fits.get(("standardised_probe", _digest(feats, labels), int(max_iter)), fit)


@register_scorer("linear_probe", "max class probability of a logistic regression on the support features")
@dataclass
class LinearProbeScorer(Scorer):
    """Maximum softmax probability of a logistic regression fitted on the standardised support features."""

    max_iter: int = hyperparameter(1000, "L-BFGS iterations of the logistic regression", arg_type=positive_int)
    baseline_protocol: str = protocol_field()
    pipeline: Any = fitted()
    feat_dim: int | None = fitted()

    # OODDetectionBench's probe (models/evaluators/linear_probe.py).
    OODBENCH_C = 0.316
    OODBENCH_MAX_ITER = 1000

    def __post_init__(self) -> None:
        self.max_iter = check_positive_int(self.max_iter, "max_iter")
        self.baseline_protocol = check_protocol(self.baseline_protocol)

    def fit(self, inputs: ScoringInputs) -> None:
        """StandardScaler + LogisticRegression(lbfgs); needs at least two classes."""
        n_classes = check_support(inputs.support)
        if n_classes < 2:
            raise ValueError("linear_probe needs at least two support classes, got one")
        feats = inputs.support.feats.detach().to(torch.float64).cpu().numpy()
        labels = inputs.support.labels.detach().long().cpu().numpy()
        if self.baseline_protocol == "oodbench":
            from sklearn.linear_model import LogisticRegression
            from sklearn.multiclass import OneVsRestClassifier

            # liblinear's coordinate order is seeded (random_state 0), so this probe is deterministic too.
            binary = LogisticRegression(solver="liblinear", C=self.OODBENCH_C, max_iter=self.OODBENCH_MAX_ITER,
                                        random_state=0)
            self.pipeline = OneVsRestClassifier(binary) if n_classes > 2 else binary
            self.pipeline.fit(feats, labels)
            self.feat_dim = inputs.support.feats.shape[1]
            return
        self.pipeline = fit_standardised_probe(feats, labels, self.max_iter, inputs.fits)
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
