"""The ReSeND scorers: the relational module's score of each scored image against reference features.

The per-pair score is the authors' (`evals/eval.py` in FrancescoCappio/ReSeND): the negated raw head
output of an L2 head, the same-class logit (column 0) of a CE head. The mapping lives here, once:
`resend_similarity`. The three scorers differ in their references and in how the per-reference
scores become a normality.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from utils.progress import progress

from evaluation.scorers.base import (
    FeatureBatch,
    PairLogits,
    Scorer,
    ScoreResult,
    ScoringInputs,
    check_positive_int,
    check_scored,
    check_support,
    class_means,
    fitted,
    hyperparameter,
    register_scorer,
)
from utils.arg_types import positive_int

PairSimilarity = Callable[[Tensor, Tensor], Tensor]
"""(feat_a [B, D], feat_b [B, D]) -> [B] similarity; higher means more likely the same class."""


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


def pairwise_similarity(similarity: PairSimilarity, targets: Tensor, references: Tensor, chunk_size: int,
                        desc: str = "pairs") -> Tensor:
    """[M, R] matrix of similarity(target, reference), target first, at most chunk_size pairs per call."""
    n_targets, n_refs = targets.shape[0], references.shape[0]
    total = n_targets * n_refs
    if total == 0:
        return torch.empty(n_targets, n_refs, dtype=targets.dtype, device=targets.device)
    out = None
    # Chunking the flat pair index (not whole targets) bounds every call by chunk_size even when
    # the reference set alone is larger than a chunk.
    starts = range(0, total, chunk_size)
    for start in progress(starts, total=len(starts), desc=desc, unit="chunk"):
        pair = torch.arange(start, min(start + chunk_size, total), device=targets.device)
        values = similarity(targets[pair // n_refs], references[pair % n_refs])
        if values.shape != pair.shape:
            raise ValueError(
                f"similarity returned shape {tuple(values.shape)} for a batch of {pair.shape[0]} pairs; expected [B]")
        if out is None:
            out = torch.empty(total, dtype=values.dtype, device=targets.device)
        out[pair] = values
    return out.view(n_targets, n_refs)


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
    min_dist[0] = -math.inf
    for _ in range(k - 1):
        distance = torch.linalg.vector_norm(swapped - swapped[chosen[-1]:chosen[-1] + 1], dim=1)
        min_dist = torch.minimum(min_dist, distance)
        nxt = int(torch.argmax(min_dist))
        chosen.append(nxt)
        min_dist[nxt] = -math.inf
    return order[chosen]


@dataclass
class RelationalScorer(Scorer):
    """Base of the ReSeND scorers: the authors' score of each scored feature against fitted references."""

    needs_pair_logits = True
    references: Tensor | None = fitted()
    pair_logits: PairLogits | None = fitted()
    pair_chunk: int | None = fitted()

    @property
    def prototypes(self) -> Tensor | None:
        """The fitted references: class means, selected support samples, or (knn) the whole support set."""
        return self.references

    def _take_relational(self, inputs: ScoringInputs) -> None:
        """Keep the relational module's pair logits and the chunk size from the bundle."""
        if inputs.pair_logits is None:
            raise ValueError(f"{self.name} needs the relational module's pair logits (ScoringInputs.pair_logits); "
                             "--backbone_only evaluates the post-hoc baselines only")
        self.pair_logits = inputs.pair_logits
        self.pair_chunk = check_positive_int(inputs.pair_chunk, "pair_chunk")

    def _similarities(self, scored: Tensor) -> Tensor:
        """[M, R] authors' score of every scored feature (first in the pair) against every reference."""
        if self.references is None:
            raise RuntimeError(f"{type(self).__name__}.score called before fit")
        check_scored(scored, self.references, "fitted references")
        return pairwise_similarity(self._pair_similarity, scored, self.references, self.pair_chunk,
                                   desc=f"{self.name}: {scored.shape[0]} x {self.references.shape[0]} pairs")

    def _pair_similarity(self, feat_a: Tensor, feat_b: Tensor) -> Tensor:
        """[B] authors' score of the pairs (feat_a[i], feat_b[i])."""
        return resend_similarity(self.pair_logits(feat_a, feat_b))


@register_scorer("resend", "ReSeND: max over known classes of the softmax of the negated raw relational "
                           "logits against the class prototypes")
@dataclass
class RelationalPrototypeScorer(RelationalScorer):
    """ReSeND: the authors' score of each target against every class-mean prototype, softmax over classes."""

    def fit(self, inputs: ScoringInputs) -> None:
        """References = mean support feature of each class 0..C-1 (the prototypes)."""
        n_classes = check_support(inputs.support)
        self._take_relational(inputs)
        with torch.no_grad():
            self.references = class_means(inputs.support.feats, inputs.support.labels.long(), n_classes)

    @torch.no_grad()
    def score(self, scored: FeatureBatch) -> ScoreResult:
        """Normality = max over classes of the softmax of the per-prototype scores; pred = its argmax."""
        sim = self._similarities(scored.feats)
        normality, pred = torch.softmax(sim, dim=1).max(dim=1)
        return ScoreResult(normality=normality, pred=pred, extra={"max_logit": sim.max(dim=1).values})


@register_scorer("resend_msp", "up to --NNK prototypes per class (nearest-to-mean, then farthest-point); max "
                               "over classes of each class's best negated logit (the authors' max logit)")
@dataclass
class MostSignificantPrototypesScorer(RelationalScorer):
    """Up to k farthest-point support samples per class as prototypes; class score = best of them."""

    k: int = hyperparameter(1, "K: prototypes per class or neighbours", flag="NNK",
                            arg_type=positive_int)
    prototype_labels: Tensor | None = fitted()
    prototype_indices: Tensor | None = fitted()
    n_classes: int | None = fitted()

    def __post_init__(self) -> None:
        self.k = check_positive_int(self.k, "k")

    def fit(self, inputs: ScoringInputs) -> None:
        """Select each class's prototypes: nearest-to-mean first, then greedy farthest points."""
        self.n_classes = check_support(inputs.support)
        self._take_relational(inputs)
        feats, labels = inputs.support.feats, inputs.support.labels.long()
        with torch.no_grad():
            picked = [members[farthest_point_indices(feats[members], self.k)]
                      for members in (torch.nonzero(labels == c).flatten() for c in range(self.n_classes))]
            self.prototype_indices = torch.cat(picked)
            self.references = feats[self.prototype_indices]
            self.prototype_labels = labels[self.prototype_indices]

    @torch.no_grad()
    def score(self, scored: FeatureBatch) -> ScoreResult:
        """Normality = max over classes of each class's best score (the authors' reported max logit).

        pred = that class; extra `max_softmax` = max of the softmax over the per-class scores (the
        authors print it second, as "MSP").
        """
        sim = self._similarities(scored.feats)
        index = self.prototype_labels.unsqueeze(0).expand(sim.shape[0], -1)
        class_scores = torch.full(
            (sim.shape[0], self.n_classes), -float("inf"), dtype=sim.dtype, device=sim.device
        ).scatter_reduce(1, index, sim, reduce="amax")
        normality, pred = class_scores.max(dim=1)
        max_softmax = torch.softmax(class_scores, dim=1).max(dim=1).values
        return ScoreResult(normality=normality, pred=pred, extra={"max_softmax": max_softmax})


@register_scorer("resend_knn", "mean of the --NNK largest negated raw relational logits against every "
                               "support image")
@dataclass
class KnnRelationalScorer(RelationalScorer):
    """The authors' score against every support sample; normality = mean of the k largest."""

    k: int = hyperparameter(1, "K: prototypes per class or neighbours", flag="NNK",
                            arg_type=positive_int)
    support_labels: Tensor | None = fitted()

    def __post_init__(self) -> None:
        self.k = check_positive_int(self.k, "k")

    def fit(self, inputs: ScoringInputs) -> None:
        """Keep the whole support set; it must hold at least k samples."""
        check_support(inputs.support)
        if inputs.support.feats.shape[0] < self.k:
            raise ValueError(f"k = {self.k} exceeds the support set size {inputs.support.feats.shape[0]}")
        self._take_relational(inputs)
        self.references = inputs.support.feats
        self.support_labels = inputs.support.labels.long()

    @torch.no_grad()
    def score(self, scored: FeatureBatch) -> ScoreResult:
        """Normality = mean of the top-k scores; pred = label of the best-scoring support sample.

        The authors' code reports no class for this variant; the nearest sample's label is ours.
        """
        sim = self._similarities(scored.feats)
        top = torch.topk(sim, self.k, dim=1).values
        # argmax (first of tied maxima) keeps the prediction deterministic, unlike topk's order.
        pred = self.support_labels[sim.argmax(dim=1)]
        return ScoreResult(normality=top.mean(dim=1), pred=pred, extra={"max_logit": top[:, 0]})
