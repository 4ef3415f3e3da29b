"""Prototype anomaly maps (after PAnS, Fontanel et al., CVPRW 2021): every region that matches no class prototype.

PAnS segments street scenes and marks every pixel whose feature matches none of the known classes'
prototypes as anomalous. Here the "pixels" are the locations of the backbone's last feature map (7 x 7
at 224 px) and the prototypes are the class means of the pooled support features: a scored image's
novelty map is 1 - (largest cosine similarity of each location's feature to a prototype), and its
image-level normality is read off that map: the worst-matched location's best cosine (`min`, the
highest unmatched-region score) or the mean over locations (`mean`). The segmentation network and
its training on StreetHazards are out of scope.

The scorer declares `needs_feature_maps`: the engine then keeps the last feature map of every image
from the same forward pass as the features. A FeatureBatch without feature maps is scored as 1 x 1
maps of the pooled features (what a 32 px input gives anyway), where the scorer is prototype_cosine.
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
    check_scored,
    check_support,
    class_means,
    fitted,
    hyperparameter,
    register_scorer,
    require_fitted,
)
from utils.arg_types import non_negative_int, one_of

REDUCTIONS = ("min", "mean")
MAP_CHUNK = 256  # scored images per block of the [block, C, h, w] cosine tensor


reduction_choice = one_of(REDUCTIONS)  # argparse type of --map_reduction


def novelty_maps(feature_maps: Tensor, prototypes: Tensor) -> tuple[Tensor, Tensor]:
    """(novelty [M, h, w] = 1 - best cosine per location, best-matching class [M, h, w]) of feature maps
    [M, D, h, w] against unit prototypes [C, D]; computed in float32 (float64 prototypes: float64)."""
    dtype = torch.float64 if prototypes.dtype == torch.float64 else torch.float32
    unit = F.normalize(feature_maps.to(dtype), dim=1)
    cosine = torch.einsum("mdhw,cd->mchw", unit, prototypes.to(dtype))
    best, cls = cosine.max(dim=1)
    return 1.0 - best, cls


@register_scorer("prototype_map", "PAnS-style anomaly map: per-location cosine of the last feature map to the class "
                                  "prototypes; normality = the worst-matched location's best cosine (--map_reduction)")
@dataclass
class PrototypeMapScorer(Scorer):
    """Normality from the novelty map 1 - max_c cos(f(location), prototype_c); pred = the pooled feature's
    nearest prototype (cosine), as prototype_cosine."""

    needs_feature_maps = True
    reduction: str = hyperparameter("min", "prototype_map: image normality from the map, 'min' (the worst-matched "
                                           "location) or 'mean' (all locations)", flag="map_reduction",
                                    arg_type=reduction_choice)
    save_maps: int = hyperparameter(0, "with prototype_map: draw the N most novel and the N most normal scored images "
                                       "with their novelty maps overlaid (maps_<dataset>_<target>.png, next to the "
                                       "results); 0 draws none", flag="save_maps", arg_type=non_negative_int)
    prototypes: Tensor | None = fitted()

    def __post_init__(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"prototype_map reduction must be one of {', '.join(REDUCTIONS)}, got {self.reduction!r}")
        if isinstance(self.save_maps, bool) or not isinstance(self.save_maps, int) or self.save_maps < 0:
            raise ValueError(f"save_maps must be a non-negative integer, got {self.save_maps!r}")

    def fit(self, inputs: ScoringInputs) -> None:
        """Prototypes = unit class means of the pooled support features (the mean of each feature map)."""
        n_classes = check_support(inputs.support)
        with torch.no_grad():
            feats = inputs.support.feats
            feats = feats if feats.dtype in (torch.float32, torch.float64) else feats.float()
            self.prototypes = F.normalize(class_means(feats, inputs.support.labels.long(), n_classes), dim=1)

    @torch.no_grad()
    def score(self, scored: FeatureBatch) -> ScoreResult:
        """Novelty maps of every scored image, their image-level normality and the pooled prediction."""
        require_fitted(self, "prototypes")
        check_scored(scored.feats, self.prototypes, "prototypes")
        maps = scored.feature_maps
        if maps is None:
            maps = scored.feats[:, :, None, None]
        if maps.ndim != 4 or maps.shape[0] != scored.feats.shape[0] or maps.shape[1] != self.prototypes.shape[1]:
            raise ValueError(f"feature_maps must be [{scored.feats.shape[0]}, {self.prototypes.shape[1]}, h, w], "
                             f"got {tuple(maps.shape)}")
        novelty = torch.cat([novelty_maps(maps[start:start + MAP_CHUNK], self.prototypes)[0]
                             for start in range(0, maps.shape[0], MAP_CHUNK)]) if maps.shape[0] else \
            maps.new_empty(0, *maps.shape[2:], dtype=torch.float32)
        flat = novelty.flatten(1)
        worst = flat.amax(dim=1) if flat.shape[0] else flat.new_empty(0)
        normality = 1.0 - (worst if self.reduction == "min" else flat.mean(dim=1))
        pooled = F.normalize(scored.feats.to(self.prototypes.dtype), dim=1) @ self.prototypes.T
        return ScoreResult(normality=normality, pred=pooled.argmax(dim=1), maps=novelty)
