"""Novelty scorers on plain feature tensors: fit on the support set, score the targets."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor

PairSimilarity = Callable[[Tensor, Tensor], Tensor]
"""(feat_a [B, D], feat_b [B, D]) -> [B] similarity; higher means more likely the same class."""

PairLogits = Callable[[Tensor, Tensor], Tensor]
"""(feat_a [B, D], feat_b [B, D]) -> raw relational head output [B, 1] (L2 head) or [B, 2] (CE head)."""

DEFAULT_CHUNK_SIZE = 65536


@dataclass
class ScoreResult:
    """Per-target normality (higher = more likely known), predicted class and extra diagnostics."""

    normality: Tensor
    pred: Tensor | None
    extra: dict[str, Tensor] = field(default_factory=dict)


class Scorer:
    """Base class: `fit` on labelled support features, then `score` target features."""

    name: str = ""

    def fit(self, support_feats: Tensor, support_labels: Tensor) -> None:
        """Store whatever the scorer needs from the support set."""
        raise NotImplementedError

    def score(self, target_feats: Tensor) -> ScoreResult:
        """Score every target feature."""
        raise NotImplementedError


SCORERS: dict[str, type[Scorer]] = {}


def register_scorer(name: str) -> Callable[[type[Scorer]], type[Scorer]]:
    """Class decorator adding a scorer to SCORERS under `name` (duplicates are an error)."""
    def _register(cls: type[Scorer]) -> type[Scorer]:
        if name in SCORERS:
            raise ValueError(f"scorer name {name!r} is already registered to {SCORERS[name].__name__}")
        cls.name = name
        SCORERS[name] = cls
        return cls
    return _register


def build_scorer(name: str, **context) -> Scorer:
    """Instantiate the scorer `name`, passing only the context entries its constructor accepts."""
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; registered scorers: {sorted(SCORERS)}")
    cls = SCORERS[name]
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return cls(**context)
    accepted = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    missing = [p.name for p in params if p.name in accepted and p.default is p.empty and p.name not in context]
    if missing:
        raise ValueError(f"scorer {name!r} needs argument(s) {missing} that were not provided")
    return cls(**{key: value for key, value in context.items() if key in accepted})


def _check_positive_int(value: int, what: str) -> int:
    """Return `value` if it is a positive int, else raise naming `what`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _check_support(support_feats: Tensor, support_labels: Tensor) -> int:
    """Validate the support set and return the number of classes C (labels must be 0..C-1)."""
    if support_feats.ndim != 2:
        raise ValueError(f"support_feats must be [N, D], got shape {tuple(support_feats.shape)}")
    if support_labels.ndim != 1 or support_labels.shape[0] != support_feats.shape[0]:
        raise ValueError(
            f"support_labels must be [N] with N = {support_feats.shape[0]}, got shape {tuple(support_labels.shape)}"
        )
    if support_feats.shape[0] == 0:
        raise ValueError("the support set is empty")
    if support_labels.dtype.is_floating_point or support_labels.dtype == torch.bool:
        raise ValueError(f"support_labels must be integer class indices, got dtype {support_labels.dtype}")
    if support_labels.device != support_feats.device:
        raise ValueError(f"support_labels on {support_labels.device} but support_feats on {support_feats.device}")
    classes = torch.unique(support_labels).tolist()
    if classes[0] < 0:
        raise ValueError(f"support labels must be non-negative, got {classes[0]}")
    n_classes = classes[-1] + 1
    if len(classes) != n_classes:
        missing = sorted(set(range(n_classes)) - set(classes))
        raise ValueError(f"support labels must be contiguous 0..{n_classes - 1}; missing class(es) {missing}")
    return n_classes


def _check_targets(target_feats: Tensor, reference: Tensor, what: str) -> None:
    """Check that targets are [M, D] on the device and with the feature size of the fitted `reference`."""
    if target_feats.ndim != 2 or target_feats.shape[1] != reference.shape[1]:
        raise ValueError(
            f"target_feats must be [M, {reference.shape[1]}] to match the {what}, got {tuple(target_feats.shape)}"
        )
    if target_feats.device != reference.device:
        raise ValueError(f"target_feats on {target_feats.device} but the {what} are on {reference.device}")


def pairwise_similarity(
    similarity: PairSimilarity, targets: Tensor, references: Tensor, chunk_size: int
) -> Tensor:
    """[M, R] matrix of similarity(target, reference), target first, at most chunk_size pairs per call."""
    n_targets, n_refs = targets.shape[0], references.shape[0]
    total = n_targets * n_refs
    if total == 0:
        return torch.empty(n_targets, n_refs, dtype=targets.dtype, device=targets.device)
    out = None
    # Chunking the flat pair index (not whole targets) bounds every call by chunk_size even when
    # the reference set alone is larger than a chunk.
    for start in range(0, total, chunk_size):
        pair = torch.arange(start, min(start + chunk_size, total), device=targets.device)
        values = similarity(targets[pair // n_refs], references[pair % n_refs])
        if values.shape != pair.shape:
            raise ValueError(
                f"similarity returned shape {tuple(values.shape)} for a batch of {pair.shape[0]} pairs; expected [B]"
            )
        if out is None:
            out = torch.empty(total, dtype=values.dtype, device=targets.device)
        out[pair] = values
    return out.view(n_targets, n_refs)


def resend_similarity(logits: Tensor) -> Tensor:
    """The authors' per-pair score [B] from raw head outputs: -logit (L2 head), same-class logit (CE head).

    The L2 training loss squashes the logit through e*sigmoid(c*x) - e/2, but the authors score
    pairs with the raw logit (their evaluation negates the head output and nothing else). The
    squashing is monotone, so it keeps each image's predicted class, but a softmax over classes
    of squashed values ranks images differently: AUROC and FPR95 would not be the paper's. So no
    sigmoid here, and c and e play no part in any score.
    """
    if logits.ndim != 2 or logits.shape[1] not in (1, 2):
        raise ValueError("relational logits must be [B, 1] (L2 head) or [B, 2] (CE head); "
                         f"got shape {tuple(logits.shape)}")
    return -logits[:, 0] if logits.shape[1] == 1 else logits[:, 0]


def class_means(feats: Tensor, labels: Tensor, n_classes: int) -> Tensor:
    """[C, D] mean feature per class; every class must have at least one sample."""
    counts = torch.bincount(labels, minlength=n_classes)
    if (counts == 0).any():
        empty = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"class(es) {empty} have no support samples")
    sums = torch.zeros(n_classes, feats.shape[1], dtype=feats.dtype, device=feats.device)
    sums.index_add_(0, labels, feats)
    return sums / counts.unsqueeze(1).to(feats.dtype)


def farthest_point_indices(feats: Tensor, k: int, half_precision: bool = True) -> Tensor:
    """Indices of min(k, n) rows: the one nearest the mean, then greedy farthest-point picks (Euclidean).

    Follows the authors' selection step by step: the row nearest the mean (float32) is swapped to
    the front, the distances of the greedy steps are computed in float16 (`half_precision`), and
    argmax ties go to the first row in that swapped order. float16 distances tie often (about three
    significant digits), so these details decide which prototypes are picked.
    """
    n = feats.shape[0]
    k = min(k, n)
    first = int(torch.argmin(torch.linalg.vector_norm(feats - feats.mean(dim=0), dim=1)))
    order = torch.arange(n, device=feats.device)
    order[0], order[first] = first, 0
    swapped = feats[order]
    min_dist = torch.linalg.vector_norm(swapped - swapped[:1], dim=1)
    if half_precision:
        swapped, min_dist = swapped.half(), min_dist.half()
    chosen = [0]
    # Chosen rows get -inf (the authors: 0) so that, when only duplicates remain, a fresh row is
    # picked rather than a repeat; the picked features are the same either way.
    min_dist[0] = -float("inf")
    for _ in range(k - 1):
        distance = torch.linalg.vector_norm(swapped - swapped[chosen[-1]:chosen[-1] + 1], dim=1)
        min_dist = torch.minimum(min_dist, distance)
        nxt = int(torch.argmax(min_dist))
        chosen.append(nxt)
        min_dist[nxt] = -float("inf")
    return order[torch.tensor(chosen, dtype=torch.long, device=feats.device)]


class RelationalScorer(Scorer):
    """Base of the ReSeND scorers: relational scores of each target against a fitted reference set.

    `pair_logits` gives the relational module's raw head output for (target, reference) pairs;
    `resend_similarity` turns it into the authors' per-pair score.
    """

    def __init__(self, pair_logits: PairLogits, chunk_size: int = DEFAULT_CHUNK_SIZE):
        self.pair_logits = pair_logits
        self.chunk_size = _check_positive_int(chunk_size, "chunk_size")
        self.references: Tensor | None = None

    @property
    def prototypes(self) -> Tensor | None:
        """The fitted references: class means, selected support samples, or (knn) the whole support set."""
        return self.references

    def _similarities(self, target_feats: Tensor) -> Tensor:
        """[M, R] similarity of every target (first in the pair) to every reference."""
        if self.references is None:
            raise RuntimeError(f"{type(self).__name__}.score called before fit")
        _check_targets(target_feats, self.references, "fitted references")
        return pairwise_similarity(self._pair_similarity, target_feats, self.references, self.chunk_size)

    def _pair_similarity(self, feat_a: Tensor, feat_b: Tensor) -> Tensor:
        """[B] authors' score of the pairs (feat_a[i], feat_b[i])."""
        return resend_similarity(self.pair_logits(feat_a, feat_b))


@register_scorer("resend")
class RelationalPrototypeScorer(RelationalScorer):
    """ReSeND: the authors' score of each target against every class-mean prototype, softmax over classes."""

    def fit(self, support_feats: Tensor, support_labels: Tensor) -> None:
        """References = mean support feature of each class 0..C-1 (the prototypes)."""
        n_classes = _check_support(support_feats, support_labels)
        with torch.no_grad():
            self.references = class_means(support_feats, support_labels.long(), n_classes)

    @torch.no_grad()
    def score(self, target_feats: Tensor) -> ScoreResult:
        """Normality = max over classes of the softmax of the per-prototype scores; pred = its argmax."""
        sim = self._similarities(target_feats)
        normality, pred = torch.softmax(sim, dim=1).max(dim=1)
        return ScoreResult(normality=normality, pred=pred, extra={"max_logit": sim.max(dim=1).values})


@register_scorer("resend_msp")
class MostSignificantPrototypesScorer(RelationalScorer):
    """Up to k farthest-point support samples per class as prototypes; class score = best of them."""

    def __init__(self, pair_logits: PairLogits, k: int, chunk_size: int = DEFAULT_CHUNK_SIZE):
        super().__init__(pair_logits, chunk_size)
        self.k = _check_positive_int(k, "k")
        self.prototype_labels: Tensor | None = None
        self.prototype_indices: Tensor | None = None
        self.n_classes = 0

    def fit(self, support_feats: Tensor, support_labels: Tensor) -> None:
        """Select each class's prototypes: nearest-to-mean first, then greedy farthest points."""
        self.n_classes = _check_support(support_feats, support_labels)
        labels = support_labels.long()
        with torch.no_grad():
            picked = []
            for c in range(self.n_classes):
                members = torch.nonzero(labels == c).flatten()
                if members.numel() == 0:
                    raise ValueError(f"class {c} has no support samples")
                picked.append(members[farthest_point_indices(support_feats[members], self.k)])
            self.prototype_indices = torch.cat(picked)
            self.references = support_feats[self.prototype_indices]
            self.prototype_labels = labels[self.prototype_indices]

    @torch.no_grad()
    def score(self, target_feats: Tensor) -> ScoreResult:
        """Normality = max over classes of each class's best score (the authors' reported max logit).

        pred = that class; extra `max_softmax` = max of the softmax over the per-class scores (the
        authors print it second, as "MSP").
        """
        sim = self._similarities(target_feats)
        index = self.prototype_labels.unsqueeze(0).expand(sim.shape[0], -1)
        class_scores = torch.full(
            (sim.shape[0], self.n_classes), -float("inf"), dtype=sim.dtype, device=sim.device
        ).scatter_reduce(1, index, sim, reduce="amax")
        normality, pred = class_scores.max(dim=1)
        max_softmax = torch.softmax(class_scores, dim=1).max(dim=1).values
        return ScoreResult(normality=normality, pred=pred, extra={"max_softmax": max_softmax})


@register_scorer("resend_knn")
class KnnRelationalScorer(RelationalScorer):
    """The authors' score against every support sample; normality = mean of the k largest."""

    def __init__(self, pair_logits: PairLogits, k: int, chunk_size: int = DEFAULT_CHUNK_SIZE):
        super().__init__(pair_logits, chunk_size)
        self.k = _check_positive_int(k, "k")
        self.support_labels: Tensor | None = None

    def fit(self, support_feats: Tensor, support_labels: Tensor) -> None:
        """Keep the whole support set; it must hold at least k samples."""
        _check_support(support_feats, support_labels)
        if support_feats.shape[0] < self.k:
            raise ValueError(f"k = {self.k} exceeds the support set size {support_feats.shape[0]}")
        self.references = support_feats
        self.support_labels = support_labels.long()

    @torch.no_grad()
    def score(self, target_feats: Tensor) -> ScoreResult:
        """Normality = mean of the top-k scores; pred = label of the best-scoring support sample.

        The authors' code reports no class for this variant; the nearest sample's label is ours.
        """
        sim = self._similarities(target_feats)
        top = torch.topk(sim, self.k, dim=1).values
        # argmax (first of tied maxima) keeps the prediction deterministic, unlike topk's order.
        pred = self.support_labels[sim.argmax(dim=1)]
        return ScoreResult(normality=top.mean(dim=1), pred=pred, extra={"max_logit": top[:, 0]})


def few_shot_indices(labels: np.ndarray, n_per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of n_per_class random samples per class (all of a smaller class), seeded."""
    n_per_class = _check_positive_int(n_per_class, "n_per_class")
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    if labels.size == 0:
        raise ValueError("labels is empty: no samples to draw a few-shot support set from")
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if members.size > n_per_class:
            members = rng.choice(members, size=n_per_class, replace=False)
        chosen.append(members)
    return np.sort(np.concatenate(chosen)).astype(np.int64)
