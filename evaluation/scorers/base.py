"""The scorer interface, its inputs bundle, hyperparameters and the registry every scorer is listed in.

A scorer is one class (a dataclass whose fields are its hyperparameters) registered under a name:

    @register_scorer("my_scorer")
    @dataclass
    class MyScorer(Scorer):
        k: int = hyperparameter(1, "neighbours", flag="NNK")
        def fit(self, inputs: ScoringInputs) -> None: ...
        def score(self, scored: FeatureBatch) -> ScoreResult: ...

`fit` receives one `ScoringInputs` bundle: the support features with their labels, the evaluation's
`FitCache` (fits that several scorers share, e.g. the linear probe), and what the scorer declares it
needs (`needs_pair_logits`: the relational module's raw pair logits; `needs_block_norms`: per-block
FeatureNorms of the support, jigsaw-shuffled support and scored images; `needs_feature_maps`: the
backbone's last feature map of the scored images). `score` receives the scored features. The
evaluation engine hands every scorer the same bundle and fits it through `fit_scorer` (which applies
the scorer's `fit_threads`); `build_scorer(name, options)` sets each hyperparameter from the
command-line flag named in its field (`options` maps flag names to values). The command line's
`--evaluator` choices, the flags of the hyperparameters and the parametrised tests all read `SCORERS`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Hashable, Mapping, TypeVar

import numpy as np
import torch
from torch import Tensor

PairLogits = Callable[[Tensor, Tensor], Tensor]
"""(feat_a [B, D], feat_b [B, D]) -> raw relational head output [B, 1] (L2 head) or [B, 2] (CE head)."""

DEFAULT_PAIR_CHUNK = 65536

Fitted = TypeVar("Fitted")


@dataclass
class FeatureBatch:
    """Features of one image set: [N, D], with class labels 0..C-1 for a support set and optional block norms."""

    feats: Tensor
    labels: Tensor | None = None
    block_norms: Tensor | None = None  # [N, n_blocks] per-block FeatureNorms (ResNetBackbone, return_block_norms)
    feature_maps: Tensor | None = None  # [N, C, h, w] last feature map before pooling (return_feature_map)


class FitCache:
    """Fits that several scorers of one evaluation share, each made once per key (e.g. per support set).

    Owned by an evaluation (one per `evaluate_splits` call, per `NoveltyDetector.fit`) and handed to
    every scorer in `ScoringInputs`: `--evaluator all` fits linear_probe's probe once for it and the four
    logit scorers on its head, and nothing outlives the evaluation. Whoever reads a fit must not modify it.
    """

    def __init__(self) -> None:
        self._fitted: dict[Hashable, Any] = {}
        self.fits = 0  # how many fits were made (the rest were reused)

    def get(self, key: Hashable, fit: Callable[[], Fitted]) -> Fitted:
        """The fit stored under `key`, made by calling `fit()` the first time the key is asked for."""
        if key not in self._fitted:
            self._fitted[key] = fit()
            self.fits += 1
        return self._fitted[key]


@dataclass
class ScoringInputs:
    """What a scorer's `fit` is handed: the support set and, when it declares the need, the extras."""

    support: FeatureBatch
    jigsaw: FeatureBatch | None = None  # the support images with their tiles shuffled (block norms only)
    pair_logits: PairLogits | None = None  # the relational module's raw head output for feature pairs
    pair_chunk: int = DEFAULT_PAIR_CHUNK  # pairs per pair_logits call
    fits: FitCache = field(default_factory=FitCache)  # the evaluation's shared fits (a fresh one by default)


@dataclass
class ScoreResult:
    """Per-sample normality (higher = more likely known), predicted class and extra diagnostics."""

    normality: Tensor
    pred: Tensor | None
    extra: dict[str, Tensor] = field(default_factory=dict)
    maps: Tensor | None = None  # [N, h, w] per-location novelty (higher = more novel), for scorers that map


def hyperparameter(default: Any, help: str, flag: str | None = None,
                   arg_type: Callable[[str], Any] | None = None) -> Any:
    """A scorer field: its default, its help text, the command-line flag (if any) that sets it and the
    argparse type that parses and range-checks the flag's value (default: the default's type)."""
    return field(default=default, metadata={"help": help, "flag": flag, "arg_type": arg_type or type(default)})


def fitted() -> Any:
    """A scorer field holding what `fit` learnt (None until then; not a hyperparameter)."""
    return field(default=None, init=False, repr=False, compare=False)


class Scorer:
    """Base class: `fit` on the support bundle, then `score` scored features."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for `--evaluator` help and the README table
    needs_pair_logits: ClassVar[bool] = False
    needs_block_norms: ClassVar[bool] = False
    needs_feature_maps: ClassVar[bool] = False
    # Shapes the activations themselves (ReAct's clip, ASH's pruning): meaningful on post-ReLU pooled features
    # whose class evidence is spread over many units, not on features where one unit carries a class.
    shapes_activations: ClassVar[bool] = False
    # Intra-op CPU threads `fit` runs with (`fit_scorer` sets them for the fit alone); None: the process's.
    # One for the scorers that train small heads (flow, latent_vae): a few thousand features through layers
    # of 64-128 units gain nothing from a second thread, and when another process holds a core OpenMP's
    # barriers make two threads far slower than one (measured on 2 shared cores: flow's fit 0.9 s with one
    # thread, 58 s with two).
    fit_threads: ClassVar[int | None] = None

    def fit(self, inputs: ScoringInputs) -> None:
        """Store whatever the scorer needs from the support set."""
        raise NotImplementedError

    def score(self, scored: FeatureBatch) -> ScoreResult:
        """Score every scored feature."""
        raise NotImplementedError


def fit_scorer(scorer: Scorer, inputs: ScoringInputs) -> None:
    """`scorer.fit(inputs)` with the scorer's `fit_threads` CPU threads, the previous count restored after."""
    if scorer.fit_threads is None:
        scorer.fit(inputs)
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(scorer.fit_threads)
    try:
        scorer.fit(inputs)
    finally:
        torch.set_num_threads(previous)


SCORERS: dict[str, type[Scorer]] = {}


def register_scorer(name: str, summary: str) -> Callable[[type[Scorer]], type[Scorer]]:
    """Class decorator listing a scorer (a dataclass) in SCORERS under `name` (duplicates are an error)."""
    def _register(cls: type[Scorer]) -> type[Scorer]:
        if name in SCORERS:
            raise ValueError(f"scorer name {name!r} is already registered to {SCORERS[name].__name__}")
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"scorer {cls.__name__} must be a dataclass (its fields are its hyperparameters)")
        cls.name = name
        cls.summary = summary
        SCORERS[name] = cls
        return cls
    return _register


def hyperparameters(cls: type[Scorer]) -> list[dataclasses.Field]:
    """The init fields of a scorer class (its hyperparameters)."""
    return [f for f in dataclasses.fields(cls) if f.init]


def scorer_flags() -> dict[str, dict[str, Any]]:
    """Every command-line flag a registered scorer's hyperparameter reads: its default, help and scorers.

    Scorers sharing a flag must share its default (one flag, one default).
    """
    flags: dict[str, dict[str, Any]] = {}
    for name, cls in SCORERS.items():
        for f in hyperparameters(cls):
            flag = f.metadata.get("flag")
            if flag is None:
                continue
            entry = flags.setdefault(flag, {"default": f.default, "help": f.metadata["help"],
                                            "arg_type": f.metadata["arg_type"], "scorers": []})
            if entry["default"] != f.default:
                raise ValueError(f"--{flag}: scorer {name} defaults to {f.default!r} but "
                                 f"{entry['scorers'][0]} to {entry['default']!r}")
            entry["scorers"].append(name)
    return flags


def build_scorer(name: str, options: Mapping[str, Any] | None = None) -> Scorer:
    """The scorer `name`, each hyperparameter from `options[its flag]` when given, else its default."""
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; registered scorers: {', '.join(SCORERS)}")
    cls = SCORERS[name]
    options = options or {}
    values = {f.name: options[f.metadata["flag"]] for f in hyperparameters(cls)
              if f.metadata.get("flag") in options}
    return cls(**values)


# ---------------------------------------------------------------------------------------------
# Checks and small helpers shared by the scorers.

def check_positive_int(value: int, what: str) -> int:
    """Return `value` if it is a positive int, else raise naming `what`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def check_non_negative_int(value: int, what: str) -> int:
    """Return `value` if it is an int >= 0 (not a bool), else raise naming `what`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
    return value


def check_number(value: float, what: str, positive: bool) -> float:
    """Return `value` if it is a finite number > 0 (`positive`) or >= 0, else raise naming `what`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (positive and value == 0):
        raise ValueError(f"{what} must be a {'positive' if positive else 'non-negative'} number, got {value!r}")
    return value


def check_support(support: FeatureBatch) -> int:
    """Validate a labelled support set and return the number of classes C (labels must be 0..C-1)."""
    feats, labels = support.feats, support.labels
    if feats.ndim != 2:
        raise ValueError(f"support features must be [N, D], got shape {tuple(feats.shape)}")
    if labels is None:
        raise ValueError("the support set needs labels (class indices 0..C-1)")
    if labels.ndim != 1 or labels.shape[0] != feats.shape[0]:
        raise ValueError(f"support labels must be [N] with N = {feats.shape[0]}, got shape {tuple(labels.shape)}")
    if feats.shape[0] == 0:
        raise ValueError("the support set is empty")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"support labels must be integer class indices, got dtype {labels.dtype}")
    if labels.device != feats.device:
        raise ValueError(f"support labels on {labels.device} but support features on {feats.device}")
    classes = torch.unique(labels).tolist()
    if classes[0] < 0:
        raise ValueError(f"support labels must be non-negative, got {classes[0]}")
    n_classes = classes[-1] + 1
    if len(classes) != n_classes:
        missing = sorted(set(range(n_classes)) - set(classes))
        raise ValueError(f"support labels must be contiguous 0..{n_classes - 1}; missing class(es) {missing}")
    return n_classes


def check_scored(scored: Tensor, reference: Tensor, what: str) -> None:
    """Check that scored features are [M, D] on the device and with the feature size of the fitted `reference`."""
    if scored.ndim != 2 or scored.shape[1] != reference.shape[1]:
        raise ValueError(f"scored features must be [M, {reference.shape[1]}] to match the {what}, "
                         f"got {tuple(scored.shape)}")
    if scored.device != reference.device:
        raise ValueError(f"scored features on {scored.device} but the {what} are on {reference.device}")


def require_fitted(scorer: Scorer, attribute: str) -> None:
    """Raise RuntimeError if `scorer.score` is called before `fit` set `attribute`."""
    if getattr(scorer, attribute) is None:
        raise RuntimeError(f"{type(scorer).__name__}.score called before fit")


def class_means(feats: Tensor, labels: Tensor, n_classes: int) -> Tensor:
    """[C, D] mean feature per class; every class must have at least one sample."""
    counts = torch.bincount(labels, minlength=n_classes)
    if (counts == 0).any():
        empty = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"class(es) {empty} have no support samples")
    sums = torch.zeros(n_classes, feats.shape[1], dtype=feats.dtype, device=feats.device)
    sums.index_add_(0, labels, feats)
    return sums / counts.unsqueeze(1).to(feats.dtype)


def floating(feats: Tensor) -> Tensor:
    """feats as float32 unless already float32/float64 (half precision loses distance accuracy)."""
    return feats if feats.dtype in (torch.float32, torch.float64) else feats.float()
