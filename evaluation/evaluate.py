"""The evaluation engine: features once per image -> every scorer -> metrics (reporting: evaluation.report).

Used by `train.py --only_eval` and by the periodic evaluation during training. The work is
sharded over processes when launched distributed; rank 0 computes the metrics and writes files.
"""
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

import evaluation.baselines  # noqa: F401  (registers the post-hoc baselines)
from datasets.benchmarks import EvalSplit, get_eval_split, resolve_targets
from datasets.image_lists import check_files_exist
from datasets.transforms import eval_transform
from evaluation.features import extract_features
from evaluation.jigsaw import JigsawTransform
from evaluation.metrics import compute_metrics
from evaluation.scorers import SCORERS, ScoreResult, build_scorer, few_shot_indices
from models.backbone import ResNetBackbone, fold_batchnorm
from utils.distributed import gather_by_index, get_world_size, is_main_process
from utils.precision import autocast

# Scorers that use the relational module (all others are post-hoc baselines on the features).
RELATIONAL_SCORERS = ("resend", "resend_msp", "resend_knn")

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
    nnk: int = 1
    pair_chunk: Optional[int] = None  # None: default_pair_chunk(device)

    def scorer_kwargs(self, device: torch.device) -> Dict[str, Any]:
        """Keyword context every scorer constructor may pick from."""
        return {"k": self.nnk, "chunk_size": self.pair_chunk or default_pair_chunk(device)}


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


def select_support(split: EvalSplit, few_shot: Optional[int], seed: int) -> List:
    """The support samples actually used: all of them, or `few_shot` random ones per class."""
    if not few_shot:
        return list(split.support)
    labels = np.array([label for _, label in split.support])
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


def scorer_uses_block_norms(name: str) -> bool:
    """Whether a registered scorer needs per-block FeatureNorms (and jigsaw support images)."""
    if name not in SCORERS:
        raise ValueError(f"unknown evaluator {name!r}; registered: {', '.join(sorted(SCORERS))}")
    return bool(getattr(SCORERS[name], "uses_block_norms", False))


def evaluate_split(backbone: ResNetBackbone, relational: Optional[torch.nn.Module],
                   split: EvalSplit, settings: EvalSettings, device: torch.device) -> List[EvalResult]:
    """Score one split with every scorer of `settings.scorers` on features computed once.

    Returns one result per scorer on rank 0 and an empty list on the other ranks. `relational` may
    be None (`--backbone_only`) when only post-hoc baselines are asked for.
    """
    validate_split(split)
    needs_relational = [name for name in settings.scorers if name in RELATIONAL_SCORERS]
    if relational is None and needs_relational:
        raise ValueError(f"{', '.join(needs_relational)} need(s) the relational module; "
                         "--backbone_only evaluates the post-hoc baselines only")
    needs_norms = any(scorer_uses_block_norms(name) for name in settings.scorers)
    seconds: Dict[str, float] = {}
    start = time.perf_counter()
    # Inference never updates BatchNorm, so a folded copy gives the same features faster.
    backbone = fold_batchnorm(backbone)
    support = select_support(split, settings.few_shot, settings.seed)
    extract = partial(extract_features, backbone, image_size=settings.image_size,
                      batch_size=settings.batch_size, num_workers=settings.num_workers, device=device,
                      amp=settings.amp, return_block_norms=needs_norms)
    support_set = extract(support, desc=f"{split.target} support").gathered()
    jigsaw_set = None
    if needs_norms:
        # FeatureNorm's pseudo-novel images: the support images with their 3x3 tiles shuffled.
        jigsaw_set = extract(support, desc=f"{split.target} jigsaw",
                             transform=JigsawTransform(eval_transform(settings.image_size),
                                                       seed=settings.seed)).gathered()
    seconds["support_features"] = time.perf_counter() - start

    start = time.perf_counter()
    target_set = extract(split.scored, desc=f"{split.target} targets")
    seconds["target_features"] = time.perf_counter() - start

    pair_logits = None if relational is None else relational_pair_logits(relational, device, settings.amp)
    labels = np.array([label for _, label in split.scored])
    results = []
    for name in settings.scorers:
        start = time.perf_counter()
        scorer = build_scorer(name, pair_logits=pair_logits, **settings.scorer_kwargs(device))
        if scorer_uses_block_norms(name):
            scorer.fit(support_set.feats, support_set.labels, block_norms=support_set.block_norms,
                       jigsaw_block_norms=jigsaw_set.block_norms)
            local = scorer.score(target_set.feats, block_norms=target_set.block_norms)
        else:
            scorer.fit(support_set.feats, support_set.labels)
            local = scorer.score(target_set.feats)
        # Each process scored its own shard: put the rows back in list order.
        result = _gather_result(local, target_set.indices, target_set.total)
        scorer_seconds = {**seconds, "scoring": time.perf_counter() - start}
        if not is_main_process():
            continue
        normality = result.normality.cpu().numpy().astype(np.float64)
        preds = None if result.pred is None else result.pred.cpu().numpy()
        metrics = compute_metrics(normality, labels, preds, split.known_classes)
        extra_metrics = {key: compute_metrics(values.cpu().numpy().astype(np.float64), labels, preds,
                                              split.known_classes)
                         for key, values in result.extra.items()}
        results.append(EvalResult(dataset=split.dataset, target=split.target, scorer=name,
                                  metrics=metrics, extra_metrics=extra_metrics, normality=normality,
                                  preds=preds, labels=labels, paths=[path for path, _ in split.scored],
                                  known_classes=split.known_classes, n_support=len(support),
                                  seconds=scorer_seconds))
    return results


def _gather_result(local: ScoreResult, indices: torch.Tensor, total: int) -> ScoreResult:
    """Gather a sharded ScoreResult by sample index (identity in a single process)."""
    if get_world_size() == 1:
        return local
    gather = lambda values: gather_by_index(values, indices, total)  # noqa: E731
    return ScoreResult(normality=gather(local.normality),
                       pred=None if local.pred is None else gather(local.pred),
                       extra={name: gather(values) for name, values in local.extra.items()})


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


def evaluate_splits(splits: List[EvalSplit], backbone: ResNetBackbone, relational: Optional[torch.nn.Module],
                    settings: EvalSettings, device: torch.device) -> List[EvalResult]:
    """Evaluate every split (sharded over processes); the results exist on rank 0 only."""
    return [result for split in splits
            for result in evaluate_split(backbone, relational, split, settings, device)]
