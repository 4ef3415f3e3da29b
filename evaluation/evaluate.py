"""The evaluation engine: features once per image -> every scorer -> metrics (reporting: evaluation.report).

Used by `train.py --only_eval` and by the periodic evaluation during training. The work is
sharded over processes when launched distributed; rank 0 computes the metrics and writes files.
"""
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from datasets.benchmarks import EvalSplit, get_eval_split, resolve_targets
from datasets.image_lists import Sample, check_files_exist
from datasets.transforms import eval_transform
from evaluation.features import ImageFeatures, extract_image_features
from evaluation.jigsaw import JigsawTransform
from evaluation.metrics import compute_metrics, fpr_at_95_tpr_interpolated
from evaluation.scorers import (FeatureBatch, FitCache, PairLogits, Scorer, ScoreResult, ScoringInputs, build_scorer,
                                fit_scorer)
from evaluation.scorers.base import check_positive_int
from models.backbone import ResNetBackbone, fold_batchnorm
from utils.distributed import gather_by_index, get_rank, get_world_size, is_main_process
from utils.precision import autocast
from utils.progress import note

# Pairs per relational-module call. On a GPU: large enough to amortise the per-call overhead,
# small enough that a [chunk, 3, 768] activation stack fits comfortably on a small card. On a CPU
# a smaller chunk keeps the MLP activations (chunk x 3 x 3072 floats) in cache: measured ~20%
# faster under bf16 at 1024 than at 16384, and no slower in fp32.
GPU_PAIR_CHUNK = 16384
CPU_PAIR_CHUNK = 1024


def default_pair_chunk(device: torch.device) -> int:
    """Pairs per relational call for `device` (see GPU_PAIR_CHUNK / CPU_PAIR_CHUNK)."""
    return CPU_PAIR_CHUNK if torch.device(device).type == "cpu" else GPU_PAIR_CHUNK


@dataclass
class EvalSettings:
    """Everything that decides how a split is scored (recorded in the output JSON)."""

    scorers: Tuple[str, ...] = ("resend",)
    image_size: int = 224
    batch_size: int = 256
    num_workers: int = 4
    amp: str = "none"
    few_shot: Optional[int] = None
    seed: int = 0
    # Values of the scorers' hyperparameter flags (e.g. {"NNK": 5}); absent ones take their defaults.
    scorer_options: Dict[str, Any] = field(default_factory=dict)
    pair_chunk: Optional[int] = None  # None: default_pair_chunk(device)
    load_truncated_images: bool = False  # decode truncated image files grey-filled instead of refusing them


@dataclass
class EvalResult:
    """Metrics and per-sample outputs of one (dataset, target) evaluation."""

    dataset: str
    target: str
    scorer: str
    metrics: Dict[str, Any]
    extra_metrics: Dict[str, Dict[str, Any]]
    normality: np.ndarray
    preds: Optional[np.ndarray]
    labels: np.ndarray
    paths: List[str]
    known_classes: int
    n_support: int
    seconds: Dict[str, float] = field(default_factory=dict)
    maps: Optional[np.ndarray] = None  # [M, h, w] novelty maps of the scored images (scorers that map)


def relational_pair_logits(relational: torch.nn.Module, device: torch.device,
                           amp: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The relational module's raw head output [B, n_outputs] (float32) for feature pairs, in eval mode."""
    relational.eval()

    @torch.inference_mode()
    def pair_logits(feat_a: torch.Tensor, feat_b: torch.Tensor) -> torch.Tensor:
        with autocast(device, amp):
            logits = relational(feat_a, feat_b)
        return logits.float()

    return pair_logits


def few_shot_indices(labels: np.ndarray, n_per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of n_per_class random samples per class (all of a smaller class), seeded."""
    n_per_class = check_positive_int(n_per_class, "n_per_class")
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


def select_support(split: EvalSplit, few_shot: Optional[int], seed: int) -> List:
    """The support samples actually used: all of them, or `few_shot` random ones per class.

    A class with fewer images than `few_shot` keeps all of them, and a line says which classes did.
    """
    if not few_shot:
        return list(split.support)
    labels = np.array([label for _, label in split.support])
    counts = np.bincount(labels)
    short = [split.class_names[c] for c in np.flatnonzero((counts > 0) & (counts < few_shot))]
    if short and is_main_process():
        print(f"--few_shot {few_shot}: {split.dataset}/{split.target} has fewer support images in "
              f"{len(short)} of {int((counts > 0).sum())} classes ({', '.join(short[:5])}"
              f"{', ...' if len(short) > 5 else ''}); all of theirs are used", flush=True)
    return [split.support[i] for i in few_shot_indices(labels, few_shot, seed)]


def validate_split(split: EvalSplit) -> None:
    """Refuse a split that cannot be scored, before any feature is computed or file written."""
    where = f"{split.dataset}/{split.target}"
    if not split.support:
        raise ValueError(f"{where}: the support set is empty")
    if not split.scored:
        raise ValueError(f"{where}: the scored set is empty")
    scored_labels = {label for _, label in split.scored}
    if not any(label < split.known_classes for label in scored_labels):
        raise ValueError(f"{where}: the scored set holds no image of a known class")
    if not any(label >= split.known_classes for label in scored_labels):
        raise ValueError(f"{where}: the scored set holds no image of an unknown class")
    check_files_exist(split.support)
    check_files_exist(split.scored)


@dataclass
class FeaturePlan:
    """Which images go through the backbone, with which transform, and which rows each split reads.

    Each distinct image once: the support images that are not scored, then the scored ones (with the
    evaluation transform; only the scored ones keep their feature maps, for a scorer that maps), then,
    for block-norm scorers, every support image again with its 3x3 tiles shuffled.
    """

    supports: List[List[Sample]]  # each split's support samples used (all, or --few_shot ones)
    support_only: List[str]
    scored: List[str]
    jigsawed: List[str]  # empty unless a scorer needs block norms
    needs_norms: bool
    needs_maps: bool

    @property
    def plain(self) -> List[str]:
        """The images with the evaluation transform, in row order: support-only, then scored."""
        return self.support_only + self.scored


@dataclass
class PlannedFeatures:
    """The backbone's output for a FeaturePlan, addressed by image path."""

    plan: FeaturePlan
    plain: ImageFeatures  # rows: plan.plain (features, and block norms if needed)
    jigsaw: Optional[ImageFeatures]  # rows: plan.jigsawed
    scored_maps: Optional[torch.Tensor]  # rows: plan.scored (scorers that map)
    seconds: float
    row_of: Dict[str, int] = field(init=False)
    jigsaw_row_of: Dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.row_of = {path: row for row, path in enumerate(self.plan.plain)}
        self.jigsaw_row_of = {path: row for row, path in enumerate(self.plan.jigsawed)}

    def support_batch(self, support: List[Sample], device: torch.device) -> FeatureBatch:
        """The labelled FeatureBatch of a split's support samples."""
        return _batch(self.plain, [self.row_of[path] for path, _ in support], [label for _, label in support], device)

    def jigsaw_batch(self, support: List[Sample], device: torch.device) -> Optional[FeatureBatch]:
        """The FeatureBatch of a split's jigsaw-shuffled support images (None when no scorer needs them)."""
        if self.jigsaw is None:
            return None
        return _batch(self.jigsaw, [self.jigsaw_row_of[path] for path, _ in support], None, device)

    def scored_batch(self, paths: List[str], device: torch.device) -> FeatureBatch:
        """The FeatureBatch of scored images (with their feature maps when they were kept)."""
        rows = [self.row_of[path] for path in paths]
        batch = _batch(self.plain, rows, None, device)
        if self.scored_maps is not None:
            # The scored images' rows start after the support-only ones.
            map_rows = torch.as_tensor(rows, dtype=torch.long, device=self.scored_maps.device)
            batch.feature_maps = self.scored_maps.index_select(0, map_rows - len(self.plan.support_only))
        return batch


def evaluate_splits(splits: List[EvalSplit], backbone: ResNetBackbone, relational: Optional[torch.nn.Module],
                    settings: EvalSettings, device: torch.device) -> List[EvalResult]:
    """Score every split with every scorer of `settings.scorers`, each image's features computed once.

    The images of all splits (support, scored and, for block-norm scorers, jigsaw-shuffled support)
    go through the backbone in one pass, each distinct image once (the PACS targets share most of
    their images). Every scorer of a split is handed the same bundle; each process scores its shard
    of the scored images. Returns one result per (split, scorer) on rank 0, none on the other ranks.
    `relational` may be None (`--backbone_only`) when only post-hoc baselines are asked for.
    """
    scorers = build_scorers(splits, relational, settings)
    plan = plan_features(splits, scorers, settings)
    features = extract_planned_features(plan, backbone, settings, device)
    pair_logits = None if relational is None else relational_pair_logits(relational, device, settings.amp)
    fits = FitCache()  # one for the whole evaluation: e.g. the linear probe fitted once per support set
    return [result for split, support in zip(splits, plan.supports)
            for result in score_split(split, support, features, scorers, settings, device, pair_logits, fits)]


def build_scorers(splits: List[EvalSplit], relational: Optional[torch.nn.Module],
                  settings: EvalSettings) -> Dict[str, Scorer]:
    """Every scorer of `settings.scorers`, after checking the splits; built first, so that a bad
    hyperparameter fails before any feature is computed."""
    for split in splits:
        validate_split(split)
    scorers = {name: build_scorer(name, settings.scorer_options) for name in settings.scorers}
    needs_relational = [name for name, scorer in scorers.items() if scorer.needs_pair_logits]
    if relational is None and needs_relational:
        raise ValueError(f"{', '.join(needs_relational)} need(s) the relational module; "
                         "--backbone_only evaluates the post-hoc baselines only")
    return scorers


def plan_features(splits: List[EvalSplit], scorers: Dict[str, Scorer], settings: EvalSettings) -> FeaturePlan:
    """The images the backbone sees for these splits and scorers (each distinct one once per transform)."""
    needs_norms = any(scorer.needs_block_norms for scorer in scorers.values())
    needs_maps = any(scorer.needs_feature_maps for scorer in scorers.values())
    supports = [select_support(split, settings.few_shot, settings.seed) for split in splits]
    scored = list(dict.fromkeys(path for split in splits for path, _ in split.scored))
    is_scored = set(scored)
    support_only = list(dict.fromkeys(path for support in supports for path, _ in support if path not in is_scored))
    jigsawed = list(dict.fromkeys(path for support in supports for path, _ in support)) if needs_norms else []
    return FeaturePlan(supports=supports, support_only=support_only, scored=scored, jigsawed=jigsawed,
                       needs_norms=needs_norms, needs_maps=needs_maps)


def extract_planned_features(plan: FeaturePlan, backbone: ResNetBackbone, settings: EvalSettings,
                             device: torch.device) -> PlannedFeatures:
    """One backbone pass (one DataLoader, sharded over processes) over every image of `plan`."""
    start = time.perf_counter()
    transform = eval_transform(settings.image_size)
    parts = [(plan.support_only, transform), (plan.scored, transform)]
    if plan.needs_norms:
        # FeatureNorm's pseudo-novel images: the support images with their 3x3 tiles shuffled.
        parts.append((plan.jigsawed, JigsawTransform(eval_transform(settings.image_size), seed=settings.seed)))
    n_images = len(plan.plain) + len(plan.jigsawed)
    # Inference never updates BatchNorm, so a folded copy gives the same features faster.
    extracted = extract_image_features(fold_batchnorm(backbone), parts, settings.batch_size, settings.num_workers,
                                       device, settings.amp, return_block_norms=plan.needs_norms,
                                       desc=f"features of {n_images} images",
                                       return_feature_maps=[False, plan.needs_maps] + [False] * plan.needs_norms,
                                       load_truncated=settings.load_truncated_images)
    support_part, scored_part = extracted[0], extracted[1]
    plain = ImageFeatures(torch.cat([support_part.feats, scored_part.feats]),
                          None if not plan.needs_norms else torch.cat([support_part.block_norms,
                                                                       scored_part.block_norms]))
    features = PlannedFeatures(plan=plan, plain=plain, jigsaw=extracted[2] if plan.needs_norms else None,
                               scored_maps=scored_part.feature_maps, seconds=time.perf_counter() - start)
    note(f"features of {n_images} images: {features.seconds:.2f} s")
    return features


def score_split(split: EvalSplit, support: List[Sample], features: PlannedFeatures, scorers: Dict[str, Scorer],
                settings: EvalSettings, device: torch.device, pair_logits: Optional[PairLogits],
                fits: FitCache) -> List[EvalResult]:
    """Fit every scorer on the split's support and score this process's shard of its scored images.

    The results are gathered in list order; rank 0 returns one per scorer, the other ranks none.
    """
    inputs = ScoringInputs(support=features.support_batch(support, device),
                           jigsaw=features.jigsaw_batch(support, device), pair_logits=pair_logits,
                           pair_chunk=settings.pair_chunk or default_pair_chunk(device), fits=fits)
    shard = torch.arange(get_rank(), len(split.scored), get_world_size())
    scored = features.scored_batch([split.scored[i][0] for i in shard.tolist()], device)
    labels = np.array([label for _, label in split.scored])
    results = []
    for name, scorer in scorers.items():
        start = time.perf_counter()
        fit_scorer(scorer, inputs)
        result = _gather_result(scorer.score(scored), shard.to(device), len(split.scored))
        seconds = {"features": features.seconds, "scoring": time.perf_counter() - start}
        note(f"{split.dataset}/{split.target} {name}: fit and score {seconds['scoring']:.2f} s")
        if is_main_process():
            results.append(_result(split, name, result, labels, len(support), seconds,
                                   interpolated_fpr=settings.scorer_options.get("baseline_protocol") == "oodbench"))
    return results


def _batch(features: ImageFeatures, rows: List[int], labels: Optional[List[int]], device: torch.device) -> FeatureBatch:
    """The FeatureBatch of some rows of extracted features (with labels for a support set)."""
    index = torch.as_tensor(rows, dtype=torch.long, device=features.feats.device)
    return FeatureBatch(features.feats.index_select(0, index),
                        None if labels is None else torch.as_tensor(labels, dtype=torch.long, device=device),
                        None if features.block_norms is None else features.block_norms.index_select(0, index))


def _result(split: EvalSplit, name: str, result: ScoreResult, labels: np.ndarray, n_support: int,
            seconds: Dict[str, float], interpolated_fpr: bool = False) -> EvalResult:
    """Metrics (and the extra columns' metrics) of one scorer's scores on one split.

    `interpolated_fpr` (--baseline_protocol oodbench) adds `fpr95_interp`: the FPR at TPR 0.95
    interpolated on the ROC curve, as OODDetectionBench reports it.
    """
    normality = result.normality.cpu().numpy().astype(np.float64)
    preds = None if result.pred is None else result.pred.cpu().numpy()
    metrics = compute_metrics(normality, labels, preds, split.known_classes)
    if interpolated_fpr:
        metrics["fpr95_interp"] = fpr_at_95_tpr_interpolated(normality, labels < split.known_classes)
    extra_metrics = {key: compute_metrics(values.cpu().numpy().astype(np.float64), labels, preds, split.known_classes)
                     for key, values in result.extra.items()}
    return EvalResult(dataset=split.dataset, target=split.target, scorer=name, metrics=metrics,
                      extra_metrics=extra_metrics, normality=normality, preds=preds, labels=labels,
                      paths=[path for path, _ in split.scored], known_classes=split.known_classes,
                      n_support=n_support, seconds=seconds,
                      maps=None if result.maps is None else result.maps.float().cpu().numpy())


def _gather_result(local: ScoreResult, indices: torch.Tensor, total: int) -> ScoreResult:
    """Gather a sharded ScoreResult by sample index (identity in a single process)."""
    if get_world_size() == 1:
        return local
    gather = lambda values: gather_by_index(values, indices, total)  # noqa: E731
    return ScoreResult(normality=gather(local.normality),
                       pred=None if local.pred is None else gather(local.pred),
                       extra={name: gather(values) for name, values in local.extra.items()},
                       maps=None if local.maps is None else gather(local.maps))


def load_splits(dataset: str, target: Optional[str], data_root: Optional[str], path_to_txt: Optional[str] = None,
                source_dir: Optional[str] = None, target_dir: Optional[str] = None) -> List[EvalSplit]:
    """Every split to evaluate, each checked (folders, lists, image files) before any scoring."""
    splits = []
    for name in resolve_targets(dataset, target):
        split = get_eval_split(dataset, name, data_root, path_to_txt=path_to_txt,
                               source_dir=source_dir, target_dir=target_dir)
        validate_split(split)
        splits.append(split)
    return splits
