"""Typed settings of a training run, built once from the parsed flags at the entry of training.

Every value comes from `train.py`'s parser (its defaults are the only ones): the types below have
no defaults of their own. Each checks what involves its own fields, with messages that name the
flags; `TrainingSettings.from_args` is the one place below `train.py` that reads the Namespace.
"""
import argparse
import functools
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple

import torch

from datasets.augment import AugmentSettings
from evaluation.evaluate import EvalSettings
from evaluation.settings import eval_settings, settings_record
from utils.optim import lr_at_iteration

# Builds the settings part of an evaluation result record from (checkpoint, backbone, relational), and
# the keyword backbone_file (models.backbone_file.BackboneFile) when the backbone came from its own file.
RecordFn = Callable[..., Dict[str, Any]]


def _refuse(checks: Iterable[Tuple[bool, str]]) -> None:
    """Raise ValueError with the message of the first failed (ok, message) check."""
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


@dataclass(frozen=True)
class DataSettings:
    """The training images, how they are paired, and how pair batches are loaded."""

    dataset: str
    target: Optional[str]
    data_root: str
    path_to_txt: Optional[str]
    train_dir: Optional[str]
    neg_to_pos_ratio: int
    class_balancing: bool
    batch_size: int  # pairs per process per micro-step
    num_workers: int
    seed: int
    load_truncated_images: bool  # decode truncated image files grey-filled instead of refusing them

    def __post_init__(self) -> None:
        _refuse([
            (self.batch_size >= 1, f"--batch_size must be at least 1 pair per process, got {self.batch_size}"),
            (self.neg_to_pos_ratio >= 1, f"--neg_to_pos_ratio must be at least 1, got {self.neg_to_pos_ratio}"),
            # Resolved by train.py (0 on the CPU, more on CUDA) before training starts.
            (isinstance(self.num_workers, int) and self.num_workers >= 0,
             f"--num_workers must be a resolved count >= 0, got {self.num_workers!r}"),
        ])

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DataSettings":
        """The data flags."""
        return cls(dataset=args.dataset, target=args.target, data_root=args.data_root,
                   path_to_txt=args.path_to_txt, train_dir=args.train_dir,
                   neg_to_pos_ratio=args.neg_to_pos_ratio, class_balancing=args.class_balancing,
                   batch_size=args.batch_size, num_workers=args.num_workers, seed=args.seed,
                   load_truncated_images=args.load_truncated_images)


@dataclass(frozen=True)
class Augmentation:
    """The random augmentation of each training image (datasets.transforms.train_transform)."""

    image_size: int
    min_scale: float
    max_scale: float
    random_horiz_flip: float
    jitter: float
    prob_jitter: float
    random_grayscale: float
    on_device: bool  # decode and augment whole batches on the training device (--device_augment)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Augmentation":
        """The augmentation flags."""
        return cls(image_size=args.image_size, min_scale=args.min_scale, max_scale=args.max_scale,
                   random_horiz_flip=args.random_horiz_flip, jitter=args.jitter, prob_jitter=args.prob_jitter,
                   random_grayscale=args.random_grayscale, on_device=args.device_augment)

    def settings(self) -> AugmentSettings:
        """The augmentation's parameters as datasets.augment reads them."""
        return AugmentSettings(self.image_size, self.min_scale, self.max_scale, self.random_horiz_flip, self.jitter,
                               self.prob_jitter, self.random_grayscale)


@dataclass(frozen=True)
class ModelSettings:
    """The architecture and where its initial weights come from."""

    network: str
    backbone_weights: str  # 'imagenet', 'none' or a state-dict path
    transf_depth: int
    transf_n_heads: int
    head_init: str
    pretrained: Optional[str]  # a checkpoint folder to start from (replaces backbone_weights)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ModelSettings":
        """The model flags."""
        return cls(network=args.network, backbone_weights=args.backbone_weights, transf_depth=args.transf_depth,
                   transf_n_heads=args.transf_n_heads, head_init=args.head_init, pretrained=args.pretrained)


@dataclass(frozen=True)
class Objective:
    """The training loss on the relational output (models.objective)."""

    loss_function: str  # "L2" (one output) or "CE" (two)
    sigmoid_compression: float
    sigmoid_expansion: float

    @property
    def n_outputs(self) -> int:
        """Outputs of the relational head this loss needs."""
        return 1 if self.loss_function == "L2" else 2

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Objective":
        """The objective flags."""
        return cls(loss_function=args.loss_function, sigmoid_compression=args.sigmoid_compression,
                   sigmoid_expansion=args.sigmoid_expansion)


@dataclass(frozen=True)
class Schedule:
    """The learning rate of every iteration: linear warm-up, then step decay or cosine."""

    learning_rate: float
    warmup: int
    step_after: int
    lr_schedule: str
    iterations: int

    def __post_init__(self) -> None:
        _refuse([
            (self.iterations >= 1, f"--iterations must be at least 1, got {self.iterations}"),
            (self.warmup >= 0, f"--warmup must be >= 0, got {self.warmup}"),
            (self.warmup <= self.iterations,
             f"--warmup {self.warmup} is longer than the whole run (--iterations {self.iterations})"),
            (self.step_after >= 1, f"--step_after must be at least 1, got {self.step_after}"),
            (self.learning_rate > 0, f"--learning_rate must be positive, got {self.learning_rate}"),
        ])

    def lr(self, iteration: int) -> float:
        """The learning rate of the optimiser step of 1-based `iteration` (lr_at_iteration counts from 0)."""
        return lr_at_iteration(iteration - 1, self.learning_rate, self.warmup, self.step_after,
                               schedule=self.lr_schedule, total_iterations=self.iterations)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Schedule":
        """The schedule flags."""
        return cls(learning_rate=args.learning_rate, warmup=args.warmup, step_after=args.step_after,
                   lr_schedule=args.lr_schedule, iterations=args.iterations)


@dataclass(frozen=True)
class Optimisation:
    """The optimiser and what one optimiser step does: accumulation, precision, clipping, lr schedule."""

    optimizer: str
    momentum: float
    weight_decay: float
    accum_steps: int  # micro-steps per optimiser step
    clip_grad: Optional[float]
    amp: str
    schedule: Schedule

    def __post_init__(self) -> None:
        _refuse([
            (self.accum_steps >= 1, f"--accum_steps must be at least 1, got {self.accum_steps}"),
            (self.clip_grad is None or self.clip_grad > 0, f"--clip_grad must be positive, got {self.clip_grad}"),
        ])

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Optimisation":
        """The optimiser, step and schedule flags."""
        return cls(optimizer=args.optimizer, momentum=args.momentum, weight_decay=args.weight_decay,
                   accum_steps=args.accum_steps, clip_grad=args.clip_grad, amp=args.amp,
                   schedule=Schedule.from_args(args))


@dataclass(frozen=True)
class RunSettings:
    """The run folder (name and place) and how often the run logs, saves and evaluates."""

    parent: str  # --checkpoint_folder_path
    name: str  # the authors' `<dataset>[_<target>]_<network>_rel_transformer[_<suffix>]`
    log_period: int
    save_period: int
    eval_period: int
    save_on_interrupt: bool

    def __post_init__(self) -> None:
        _refuse([(min(self.log_period, self.save_period, self.eval_period) >= 1,
                  "--log_period, --save_period and --eval_period must be at least 1")])

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "RunSettings":
        """The run folder and period flags."""
        parts = [args.dataset, *([args.target] if args.target else []), args.network, "rel_transformer",
                 *([args.suffix] if args.suffix else [])]
        return cls(parent=args.checkpoint_folder_path, name="_".join(parts), log_period=args.log_period,
                   save_period=args.save_period, eval_period=args.eval_period,
                   save_on_interrupt=args.save_on_interrupt)


@dataclass(frozen=True)
class ResumeSettings:
    """Whether and from where a run continues, and whether changed settings are accepted."""

    resume: Optional[str]  # a run folder, "auto" (this run's folder) or None
    auto_resume: bool
    resume_override: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ResumeSettings":
        """The resume flags."""
        return cls(resume=args.resume, auto_resume=args.auto_resume, resume_override=args.resume_override)


@dataclass(frozen=True)
class ProcessSettings:
    """Where this process computes, and how it joins the others."""

    device: torch.device
    distributed: bool  # launched with more than one process
    sync_bn: bool  # resolved: --sync_bn, or on for CUDA when not given

    def __post_init__(self) -> None:
        if not isinstance(self.device, torch.device):
            raise TypeError(f"device must be a torch.device, got {self.device!r} ({type(self.device).__name__}); "
                            "utils.distributed.init_distributed_mode resolves --device before training")
        # torch's SyncBatchNorm only runs on GPUs; without this check the first forward fails mid-run.
        _refuse([(not (self.sync_bn and self.distributed and self.device.type != "cuda"),
                  f"--sync_bn true needs --device cuda (got {self.device}); use --sync_bn false on the CPU")])

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ProcessSettings":
        """The device and process flags, as utils.distributed.init_distributed_mode resolved them."""
        on_cuda = isinstance(args.device, torch.device) and args.device.type == "cuda"
        sync_bn = args.sync_bn if args.sync_bn is not None else on_cuda
        return cls(device=args.device, distributed=args.distributed, sync_bn=sync_bn)


@dataclass(frozen=True)
class PeriodicEvalSettings:
    """The evaluation during training: which benchmark, and how it is scored and recorded."""

    dataset: Optional[str]  # --eval_dataset; None: the training set's default (datasets.train_lists)
    target: Optional[str]
    data_root: str
    path_to_txt: Optional[str]
    source_dir: Optional[str]
    target_dir: Optional[str]
    backbone_checkpoint: Optional[str]  # a backbone file the evaluation uses instead of the trained backbone
    scoring: EvalSettings
    record: RecordFn  # evaluation.settings.settings_record bound to these flags (the record of each result)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "PeriodicEvalSettings":
        """The evaluation flags, through evaluation.settings (which checks them)."""
        scoring = eval_settings(args)
        return cls(dataset=args.eval_dataset, target=args.eval_target, data_root=args.data_root,
                   path_to_txt=args.path_to_txt, source_dir=args.source_dir, target_dir=args.target_dir,
                   backbone_checkpoint=args.backbone_checkpoint, scoring=scoring,
                   record=functools.partial(settings_record, args, scoring, iteration=None))


@dataclass(frozen=True)
class TrainingSettings:
    """Everything a training run is given, in one typed object per concern."""

    data: DataSettings
    augmentation: Augmentation
    model: ModelSettings
    objective: Objective
    optimisation: Optimisation
    run: RunSettings
    resume: ResumeSettings
    process: ProcessSettings
    evaluation: PeriodicEvalSettings
    # Every flag's value as parsed (read-only): recorded in args.json and checkpoint.pth, and what a
    # resume compares with the checkpoint's record (training.state.resume_differences).
    flags: Mapping[str, Any]

    def __post_init__(self) -> None:
        _refuse([(not (self.resume.resume and self.model.pretrained), "--resume and --pretrained exclude each other")])

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainingSettings":
        """The settings of a run from train.py's parsed flags (after init_distributed_mode resolved the device)."""
        # The order of the checks is the order of the messages a run with several bad flags shows.
        return cls(data=DataSettings.from_args(args), augmentation=Augmentation.from_args(args),
                   optimisation=Optimisation.from_args(args), run=RunSettings.from_args(args),
                   model=ModelSettings.from_args(args), objective=Objective.from_args(args),
                   resume=ResumeSettings.from_args(args), process=ProcessSettings.from_args(args),
                   evaluation=PeriodicEvalSettings.from_args(args), flags=MappingProxyType(dict(vars(args))))
