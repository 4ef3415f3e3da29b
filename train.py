"""ReSeND: train the relational novelty detector on image pairs, or evaluate a checkpoint.

Launch commands (see README.md and docs/ for data layout and recipes):

    # the embedded demo: trains on scikit-learn's digits and scores novel digits (CPU, minutes)
    python train.py --demo

    # evaluate the authors' released checkpoint on every PACS target
    python train.py --dataset PACS_DG --target all --only_eval \
        --checkpoint_folder_path outputs/ImageNet_resnet18_rel_transformer/

    # one deployable file (a torch.export .pt2 with the class prototypes of a target's support set)
    python train.py --export detector.pt2 --dataset PACS_DG --target ArtPainting \
        --checkpoint_folder_path outputs/ImageNet_resnet18_rel_transformer/

    # the paper's training run: 16 GPUs x 256 pairs, LARS, 13k iterations
    torchrun --nproc_per_node=16 train.py
    python -m torch.distributed.launch --nproc_per_node=16 --use_env train.py

    # fewer GPUs, same effective batch of 4096 pairs
    torchrun --nproc_per_node=4 train.py --accum_steps 4
"""
import argparse
import copy
import os
import sys
from typing import Sequence, Set

import torch

from utils.environment import torchvision_problem

if __name__ == "__main__" and torchvision_problem():
    # Checked before the project's imports, which import torchvision and would fail deep inside it.
    sys.exit(f"error: {torchvision_problem()}")

from datasets.benchmarks import benchmark_names  # noqa: E402
from datasets.image_lists import DataError  # noqa: E402
from datasets.train_lists import training_set_names, training_uses_target  # noqa: E402
from evaluation.scorers import SCORERS, scorer_flags  # noqa: E402
from utils.distributed import add_distributed_args, cleanup, init_distributed_mode  # noqa: E402
from utils.arg_types import (boolean, crop_scale, int_at_least, non_negative_float, non_negative_int,  # noqa: E402
                             positive_float, positive_int, probability)
from utils.precision import AMP_MODES, use_tf32  # noqa: E402
from utils.progress import set_quiet  # noqa: E402

CUDA_NUM_WORKERS = 4  # DataLoader processes per GPU process when --num_workers is not given
# Exceptions that report bad input (DataError and CheckpointError are ValueErrors; OSError covers
# missing files and failed writes): shown as one line, since the message names the path or value.
USER_ERRORS = (ValueError, OSError)
# Bad arguments and bad data exit with 2 (as argparse does for a bad flag); every other error with 1.
USAGE_ERRORS = (DataError, FileNotFoundError)
DEBUG_ERRORS_ENV = "RESEND_DEBUG_ERRORS"


class UsageError(ValueError):
    """Flags that cannot be used together."""


class DefaultOnceHelpFormatter(argparse.HelpFormatter):
    """Shows each flag's default once: appended unless the help text states it; None and a switch's False
    omitted; a yes/no value as on/off (0 is a default like any other, not a missing one)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is argparse.SUPPRESS or not action.option_strings:
            return text
        if isinstance(default, bool):
            if action.nargs == 0:  # store_true / store_false: the switch itself says it
                return text
            return f"{text} (default: {'on' if default else 'off'})".strip()
        return f"{text} (default: %(default)s)".strip()


def get_args_parser() -> argparse.ArgumentParser:
    """All command-line flags; names follow the authors' code where a flag exists there."""
    parser = argparse.ArgumentParser("ReSeND", add_help=True, formatter_class=DefaultOnceHelpFormatter)

    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="ImageNet", choices=sorted(set(training_set_names()) | set(benchmark_names())),
                      help="training set, or with --only_eval the benchmark to evaluate")
    data.add_argument("--target", default=None,
                      help="benchmark target domain (e.g. ArtPainting, Clipart) or 'all'")
    data.add_argument("--data_root", default=os.path.expanduser("~/data"), help="root of the data sets")
    data.add_argument("--path_to_txt", default=None,
                      help="folder with the authors' list files (<dir>/<dataset>/<list>.txt) for exact reproduction")
    data.add_argument("--source_dir", default=None, help="Folder eval: one subfolder per known class (support)")
    data.add_argument("--target_dir", default=None, help="Folder eval: one subfolder per class to score")
    data.add_argument("--train_dir", default=None, help="Folder training: one subfolder per class")
    data.add_argument("--load_truncated_images", action="store_true",
                      help="decode truncated images with their missing part grey, as the authors' code does "
                           "(each named in a warning); without it a truncated image is an error naming it")
    data.add_argument("--image_size", type=int_at_least(32), default=224,
                      help="square input size in pixels, at least 32 (the backbone downsamples 32x)")
    data.add_argument("--num_workers", type=non_negative_int, default=None,
                      help=f"DataLoader workers per process (default: {CUDA_NUM_WORKERS} on CUDA, 0 on CPU)")

    model = parser.add_argument_group("model")
    model.add_argument("--network", default="resnet18", choices=["resnet18", "resnet50"])
    model.add_argument("--backbone_weights", default="imagenet",
                       help="'imagenet' (torchvision IMAGENET1K_V1), 'none' (random init) or a state-dict path")
    model.add_argument("--transf_depth", type=positive_int, default=4, help="relational transformer blocks")
    model.add_argument("--transf_n_heads", type=positive_int, default=12, help="attention heads per block")
    model.add_argument("--head_init", default="vit", choices=["vit", "zero"],
                       help="relational head init: ViT trunc-normal (authors) or zeros (from-scratch runs)")
    model.add_argument("--loss_function", default="L2", choices=["L2", "CE"])
    model.add_argument("--sigmoid_compression", type=positive_float, default=10.0,
                       help="c in the L2 training loss's e*sigmoid(c*x)-e/2 (scores use the raw logit x)")
    model.add_argument("--sigmoid_expansion", type=positive_float, default=2.0,
                       help="e in the L2 training loss's e*sigmoid(c*x)-e/2 (scores use the raw logit x)")

    train = parser.add_argument_group("training")
    train.add_argument("--batch_size", type=positive_int, default=256, help="pairs per process per micro-step")
    train.add_argument("--accum_steps", type=positive_int, default=1,
                       help="micro-steps per optimiser step (effective batch = batch_size x world x accum)")
    train.add_argument("--iterations", type=positive_int, default=13000, help="optimiser steps")
    train.add_argument("--learning_rate", type=positive_float, default=0.008)
    train.add_argument("--optimizer", default="lars", choices=["lars", "sgd"])
    train.add_argument("--momentum", type=non_negative_float, default=0.9)
    train.add_argument("--weight_decay", type=non_negative_float, default=5e-4,
                       help="authors' code value (the paper text says 5e-5)")
    train.add_argument("--warmup", type=non_negative_int, default=500, help="linear warm-up iterations")
    train.add_argument("--step_after", type=positive_int, default=13000, help="lr x0.1 every this many iterations")
    train.add_argument("--lr_schedule", default="step", choices=["step", "cosine"],
                       help="after warm-up: the authors' step decay, or cosine to 0")
    train.add_argument("--clip_grad", type=positive_float, default=None, help="clip the gradient norm at this value (default: off)")
    train.add_argument("--neg_to_pos_ratio", type=positive_int, default=20, help="negative pairs per anchor")
    train.add_argument("--class_balancing", type=boolean, default=True,
                       help="extra anchors for classes smaller than the largest one")
    train.add_argument("--min_scale", type=crop_scale, default=0.8, help="RandomResizedCrop scale min, in (0, 1]")
    train.add_argument("--max_scale", type=crop_scale, default=1.0, help="RandomResizedCrop scale max, in (0, 1]")
    train.add_argument("--random_horiz_flip", type=probability, default=0.5, help="probability of a horizontal flip")
    train.add_argument("--jitter", type=non_negative_float, default=0.8,
                       help="ColorJitter brightness/contrast/saturation")
    train.add_argument("--prob_jitter", type=probability, default=0.5, help="probability of the colour jitter")
    train.add_argument("--random_grayscale", type=probability, default=0.1, help="probability of grayscale")
    train.add_argument("--device_augment", action="store_true",
                       help="DataLoader workers only read the files and draw the random augmentation; each batch "
                            "is decoded (nvJPEG on CUDA) and augmented on the training device, with the same "
                            "parameters as the default per-image path")
    train.add_argument("--amp", default="none", choices=AMP_MODES, help="mixed precision (CUDA and CPU)")
    train.add_argument("--no_tf32", action="store_true",
                       help="with --amp none on CUDA, keep matmuls and convolutions in full fp32 (default: TF32, "
                            "as the authors' torch 1.8 ran them on Ampere and later GPUs)")
    train.add_argument("--sync_bn", type=boolean, default=None,
                       help="SyncBatchNorm when distributed (default: on for CUDA, off on the CPU)")
    train.add_argument("--seed", type=int, default=0)

    run = parser.add_argument_group("run folder, logging, checkpoints")
    run.add_argument("--checkpoint_folder_path", default="outputs",
                     help="training: parent of the run folder; --only_eval: the checkpoint folder")
    run.add_argument("--suffix", default=None, help="appended to the run folder name")
    run.add_argument("--resume", nargs="?", const="auto", default=None,
                     help="continue from a run folder's checkpoint.pth (no value: this run's folder)")
    run.add_argument("--auto_resume", action="store_true",
                     help="resume when the run folder already holds a checkpoint (for torchrun --max_restarts)")
    run.add_argument("--resume_override", action="store_true",
                     help="let --resume/--auto_resume continue with settings that differ from the checkpoint's "
                          "(model, data, objective, optimiser, schedule); the differences are logged and "
                          "recorded in args.json under resume_overrides")
    run.add_argument("--save_on_interrupt", action="store_true",
                     help="on SIGINT/SIGTERM, save a checkpoint at the current iteration before stopping "
                          "(without it, the last periodic checkpoint is kept)")
    run.add_argument("--pretrained", default=None,
                     help="initialise from a checkpoint folder (authors' or ours) and start at iteration 0")
    run.add_argument("--log_period", type=positive_int, default=10, help="iterations per log line")
    run.add_argument("--save_period", type=positive_int, default=500, help="iterations per checkpoint")
    run.add_argument("--eval_period", type=positive_int, default=500, help="iterations per periodic evaluation")
    run.add_argument("--eval_dataset", default=None,
                     help="periodic evaluation benchmark (default: DomainNet_IN_OUT for ImageNet, else none)")
    run.add_argument("--eval_target", default=None, help="target(s) of --eval_dataset")

    run.add_argument("--quiet", action="store_true",
                     help="no progress bars, progress lines or per-phase notes (results and errors still print)")
    run.add_argument("--debug_errors", action="store_true",
                     help=f"on an input error, show the Python traceback instead of the one-line message "
                          f"(also with the environment variable {DEBUG_ERRORS_ENV}=1)")
    run.add_argument("--demo", action="store_true",
                     help="train and evaluate on the embedded Digits data (settings: training/demo.py)")

    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--only_eval", action="store_true", help="evaluate --checkpoint_folder_path")
    evaluation.add_argument("--export", default=None, metavar="PATH",
                            help="write --checkpoint_folder_path as one deployable file (a torch.export .pt2: "
                                 "backbone, relational module and the resend class prototypes of the support set "
                                 "of --dataset/--target or --source_dir, with its metadata), loadable with "
                                 "torch.export.load without this repository")
    evaluation.add_argument("--eval_batch_size", type=positive_int, default=256)
    evaluation.add_argument("--few_shot", type=positive_int, default=None, help="N random support images per class")
    evaluation.add_argument("--most_significant_prototypes", action="store_true",
                            help="up to NNK prototypes per class (farthest-point selection)")
    evaluation.add_argument("--knn_distance_evaluator", action="store_true",
                            help="score against every support sample; mean of the NNK largest")
    # The scorers' hyperparameter flags and the --evaluator choices come from the scorer registry.
    for flag, entry in scorer_flags().items():
        evaluation.add_argument(f"--{flag}", type=entry["arg_type"], default=entry["default"],
                                help=f"{entry['help']}; read by {', '.join(entry['scorers'])}")
    evaluation.add_argument("--evaluator", default=None,
                            help=f"scorer(s), comma-separated, or 'all': {', '.join(SCORERS)} "
                                 "(default: the one the flags above select)")
    evaluation.add_argument("--backbone_only", action="store_true",
                            help="evaluate the baselines on the --backbone_weights backbone alone, no checkpoint")
    evaluation.add_argument("--backbone_checkpoint", default=None, metavar="PATH",
                            help="evaluate with the backbone of this file instead of the checkpoint's, under the "
                                 "relational module of --checkpoint_folder_path (--only_eval) or the one being "
                                 "trained (periodic evaluation); with --backbone_only, the backbone evaluated. "
                                 "A torchvision/timm ResNet state dict (a classifier's fc.* is dropped; also "
                                 "under 'state_dict' or 'model', 'module.' prefix removed; .safetensors) or a "
                                 "feature_extractor.pkl; its SHA-256 is recorded and the result group is named "
                                 "..._bb-<file stem>_<hash8>")
    evaluation.add_argument("--tag", default=None,
                            help="--only_eval: name of the result group under <folder>/eval/ (letters, digits, "
                                 "'.', '_', '-'); default <dataset>_it<iteration>_<hash of the settings>")

    add_distributed_args(parser)
    return parser


def explicit_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> Set[str]:
    """Destinations of the flags actually given in `argv` (defaults suppressed)."""
    probe = argparse.ArgumentParser(add_help=False)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            probe._add_action(copy.copy(action)).default = argparse.SUPPRESS
    return set(vars(probe.parse_known_args(argv)[0]))


def parse_command_line(argv: Sequence[str]) -> argparse.Namespace:
    """Parse `argv`; with --demo, the demo's settings fill every flag not given explicitly."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    # --only_eval takes the run folder's settings for every flag not given here (evaluation/run.py).
    args.explicit_flags = sorted(explicit_flags(parser, argv))
    if args.demo:
        from training.demo import apply_demo_settings
        apply_demo_settings(args, args.explicit_flags)
    return args


def resolve_num_workers(args: argparse.Namespace) -> None:
    """Fill the device-dependent --num_workers default once the device is known."""
    if args.num_workers is None:
        # On a CPU the compute threads already occupy every core and loader processes only compete
        # with them (2-core eval: 34.2 ms/img with 2 workers, 31.8 with 0); on a GPU they overlap.
        args.num_workers = 0 if torch.device(args.device).type == "cpu" else CUDA_NUM_WORKERS


def check_flag_combinations(args: argparse.Namespace) -> None:
    """Refuse settings that involve several flags; each flag's own range is checked by the parser."""
    if args.min_scale > args.max_scale:
        raise UsageError(f"--min_scale {args.min_scale} is larger than --max_scale {args.max_scale}")
    if args.target is not None and not (args.only_eval or args.export) and not training_uses_target(args.dataset):
        # The run folder is named after the target, so an ignored target would still mislabel the run.
        choosers = [name for name in training_set_names() if training_uses_target(name)]
        raise UsageError(f"--target {args.target} has no meaning when training on {args.dataset}; "
                         f"--target selects the training target of {', '.join(choosers)} "
                         "or, with --only_eval, the target to score")
    if args.backbone_checkpoint is not None and args.only_eval and args.backbone_only \
            and "backbone_weights" in getattr(args, "explicit_flags", ()):
        raise UsageError("--backbone_weights and --backbone_checkpoint both name the backbone of --backbone_only; "
                         "give one")


def main(args: argparse.Namespace) -> None:
    """Set up processes, then export (--export), evaluate (--only_eval) or train."""
    check_flag_combinations(args)
    set_quiet(args.quiet)
    if args.device == "cpu" or not torch.cuda.is_available():
        # Saturated sigmoid gradients become denormal floats, which made CPU steps ~30x slower on
        # some CPUs (measured no difference on an AMD AVX512 one); flushing them costs nothing.
        torch.set_flush_denormal(True)
    # fp32 runs on CUDA use TF32 as the authors' torch 1.8 did, unless --no_tf32; mixed precision
    # runs keep full fp32 for what autocast leaves in fp32.
    use_tf32(args.amp == "none" and not args.no_tf32)
    init_distributed_mode(args)
    resolve_num_workers(args)
    try:
        if args.export is not None:
            from evaluation.export_run import run_export
            run_export(args)
        elif args.only_eval:
            from evaluation.run import run_only_eval
            run_only_eval(args)
        elif args.demo:
            from training.demo import run_demo
            run_demo(args)
        else:
            from training.main import run_training
            from training.settings import TrainingSettings
            run_training(TrainingSettings.from_args(args))
    finally:
        cleanup()


def run_command_line(argv: Sequence[str]) -> int:
    """Parse and run; errors in the user's input end in one line on stderr (exit 2 for bad
    arguments or data, 1 otherwise), not a traceback; under torchrun only rank 0 prints it."""
    args = parse_command_line(argv)
    try:
        main(args)
    except KeyboardInterrupt as error:
        # Training raises a KeyboardInterrupt subclass whose message names the iteration and the
        # last checkpoint, and whose exit_code follows the signal (130 SIGINT, 143 SIGTERM).
        _report(str(error) or "interrupted")
        return getattr(error, "exit_code", 130)
    except USER_ERRORS as error:
        if args.debug_errors or os.environ.get(DEBUG_ERRORS_ENV, "") not in ("", "0"):
            raise
        _report(f"error: {error}")
        return 2 if isinstance(error, USAGE_ERRORS + (UsageError,)) else 1
    return 0


def _report(line: str) -> None:
    """Print the final line on stderr, on rank 0 only (every rank of a torchrun job fails alike)."""
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(run_command_line(sys.argv[1:]))
