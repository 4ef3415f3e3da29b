"""`train.py --demo`: train ReSeND on the embedded Digits data and score both novelty targets.

Digits (scikit-learn's copy of the UCI handwritten digits) needs no download, so the whole method -
pair training, prototypes, relational scoring, metrics, TensorBoard, figures - runs on a laptop CPU
in a few minutes. The settings below differ from the ImageNet recipe only where training from
scratch on tiny data needs it (see docs/demo.md).
"""
import argparse
import os
import shutil
from typing import Dict, Iterable, List

from datasets.digits import digits_root, prepare_digits
from evaluation.report import format_table
from evaluation.groups import latest_group
from training.run_folder import folder_size
from utils.atomic_files import atomic_open
from utils.distributed import barrier, is_main_process

# Each value is applied unless the same flag was given on the command line.
DEMO_SETTINGS: Dict[str, object] = {
    "dataset": "Digits",
    "image_size": 32,
    "backbone_weights": "none",  # no download: the backbone is trained from scratch
    "batch_size": 64,
    # Three negatives per anchor (the authors use 20): over three runs (seeds 0 and 1, 1 and 2
    # threads) seen AUROC was 0.81-0.92 with one and 0.93-0.95 with three.
    "neg_to_pos_ratio": 3,
    "iterations": 300,
    # LARS moves each layer by ~lr x 1e-3 of its norm per step: right for fine-tuning an ImageNet
    # backbone over 13k steps, far too slow from scratch in 200 steps.
    "optimizer": "sgd",
    "learning_rate": 0.01,
    "warmup": 20,
    "lr_schedule": "cosine",
    # 2*sigmoid(10x)-1 saturates: from a random head, SGD drives every output to one end within
    # ~20 steps and the loss never moves again. A zero head and clipped gradients avoid that, but
    # with c = 10 runs still drifted into a saturated "different" corner and stayed there (one of
    # two runs differing only in float rounding collapsed to AUROC 0.42). c = 1 (2*sigmoid(x)-1)
    # keeps the gradient alive: loss 0.16-0.21 by step 200 where c = 10 sat near 1.2.
    "clip_grad": 1.0,
    "head_init": "zero",
    "sigmoid_compression": 1.0,
    # Digits are centred grey glyphs: colour jitter, flips (a flipped 2 is no digit) and random crops
    # (which cut strokes off at 32 px) kept the from-scratch model from learning within the budget.
    "prob_jitter": 0.0,
    "random_grayscale": 0.0,
    "random_horiz_flip": 0.0,
    "min_scale": 1.0,
    "num_workers": 1,
    "log_period": 10,
    # A checkpoint within the first minute on 2 cores (~0.4-0.6 s per iteration), so that a run
    # stopped early still has something to evaluate.
    "save_period": 50,
    "eval_dataset": "Digits",
    "eval_target": "all",
    # ReSeND next to the post-hoc baselines and the neighbouring methods on the same features
    # (resend_knn is left out: it scores every target against all 631 support images through the
    # relational module).
    "evaluator": "resend,prototype_cosine,prototype_distance,knn,mahalanobis,featurenorm,linear_probe,"
                 "energy,max_logit,react,ash_b,flow,latent_vae,prototype_map",
    # The anomaly-map figure of prototype_map: at 32 px the backbone's last feature map is 1 x 1, so
    # each image gets one cell (docs/baselines.md shows 4 x 4 maps of the same run at 128 px).
    "save_maps": 4,
    "eval_batch_size": 256,
}


def apply_demo_settings(args: argparse.Namespace, explicit: Iterable[str]) -> argparse.Namespace:
    """Fill in the demo's settings for every flag the user did not set explicitly."""
    explicit = set(explicit)
    for key, value in DEMO_SETTINGS.items():
        if key not in explicit:
            setattr(args, key, value)
    if args.dataset != "Digits":
        raise ValueError(f"--demo trains on Digits; got --dataset {args.dataset}")
    if "eval_period" not in explicit:
        args.eval_period = args.iterations  # evaluate once, at the end
    return args


def copy_group_figures(group: str, figures: str, dataset: str) -> List[str]:
    """Copy a result group's `roc_<dataset>.png` and `scores_<dataset>.png` to `figures/`; the paths written.

    The group's figures were drawn with it (one that could not be drawn was a warning then); one that
    is missing or cannot be copied is a warning here too.
    """
    written = []
    for name, source_name in (("roc.png", f"roc_{dataset}.png"), ("score_histograms.png", f"scores_{dataset}.png")):
        source, target = os.path.join(group, source_name), os.path.join(figures, name)
        try:
            with open(source, "rb") as drawn, atomic_open(target, "wb") as out:
                shutil.copyfileobj(drawn, out)
        except OSError as error:
            print(f"warning: {target} not written: {error.strerror or error} ({error.filename or source})", flush=True)
            continue
        written.append(target)
    return written


def run_demo(args: argparse.Namespace) -> str:
    """Prepare Digits if absent, train, evaluate both targets, print the table, copy the figures to figures/."""
    from training.main import run_training  # after the demo settings are applied
    from training.settings import TrainingSettings

    if is_main_process():
        existed = os.path.isdir(digits_root(args.data_root))
        root = prepare_digits(args.data_root)
        print(f"data: {root} ({'already there' if existed else 'written now'}); run folders go under "
              f"{os.path.abspath(args.checkpoint_folder_path)}", flush=True)
    barrier()  # the other processes read the tree rank 0 has just written
    folder, results = run_training(TrainingSettings.from_args(args))
    if is_main_process() and results:
        print(format_table(results), flush=True)
        # The final evaluation's group holds its figures: figures/ gets the ROC and histograms under fixed names.
        final = latest_group(folder, kind="periodic", dataset=args.dataset, iteration=args.iterations)
        drawn = copy_group_figures(final.path, os.path.join(folder, "figures"), args.dataset)
        drawn += sorted(os.path.join(final.path, name) for name in final.manifest["files"] if name.startswith("maps_"))
        print(f"run folder: {folder} ({folder_size(folder)})\nresults: {final.path}\nfigures: {', '.join(drawn) or 'none'}\n"
              f"TensorBoard: tensorboard --logdir {os.path.join(folder, 'tensorboard')}")
    return folder
