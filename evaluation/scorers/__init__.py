"""Novelty scorers: one file per family, every scorer listed in `SCORERS` (see `base.py` for the interface).

Importing this package imports every family module, so `SCORERS` and `build_scorer` are complete
wherever they are used. A new family file is imported here; a new scorer in an existing family
file needs nothing else.
"""
# The order of these imports is the order of SCORERS: the ReSeND scorers first in every table.
from evaluation.scorers import resend  # noqa: F401  (isort: skip)
from evaluation.scorers import distance, featurenorm, probe  # noqa: F401  (isort: skip)
from evaluation.scorers import classifier, density, latent, maps  # noqa: F401  (isort: skip)
from evaluation.scorers.base import (SCORERS, FeatureBatch, FitCache, PairLogits, Scorer, ScoreResult,
                                     ScoringInputs, build_scorer, fit_scorer, hyperparameter, register_scorer,
                                     scorer_flags)

__all__ = ["SCORERS", "FeatureBatch", "FitCache", "PairLogits", "Scorer", "ScoreResult", "ScoringInputs",
           "build_scorer", "fit_scorer", "hyperparameter", "register_scorer", "scorer_flags"]
