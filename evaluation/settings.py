"""Evaluation settings from parsed command-line arguments (shared by --only_eval and training).

Turns the flags into the typed `EvalSettings` the engine takes, picks the scorers, and builds the
record of every setting that changes a number (written with each result).
"""
import argparse
import os
from typing import Any, Dict, Optional, Tuple

import torch

from evaluation.evaluate import EvalSettings
from evaluation.groups import validate_tag
from evaluation.run_settings import backbone_record, model_facts
from evaluation.scorers import SCORERS, scorer_flags
from models.backbone_file import BackboneFile


def scorer_names(args: argparse.Namespace) -> Tuple[str, ...]:
    """The scorers to run: `--evaluator` (a list, or `all`), else the one the authors' flags select."""
    if args.most_significant_prototypes and args.knn_distance_evaluator:
        raise ValueError("choose one of --most_significant_prototypes and --knn_distance_evaluator")
    if args.evaluator:
        if args.evaluator == "all":
            names = [name for name, cls in SCORERS.items() if not (args.backbone_only and cls.needs_pair_logits)]
        else:
            names = [name.strip() for name in args.evaluator.split(",") if name.strip()]
        unknown = [name for name in names if name not in SCORERS]
        if unknown or not names:
            raise ValueError(f"unknown --evaluator {', '.join(unknown) or repr(args.evaluator)}; "
                             f"valid: {', '.join(SCORERS)}, all")
        return tuple(dict.fromkeys(names))
    if args.backbone_only:
        raise ValueError("--backbone_only scores with post-hoc baselines: give --evaluator "
                         f"(e.g. all or {', '.join(n for n, cls in SCORERS.items() if not cls.needs_pair_logits)})")
    if args.most_significant_prototypes:
        return ("resend_msp",)
    if args.knn_distance_evaluator:
        return ("resend_knn",)
    return ("resend",)


def eval_settings(args: argparse.Namespace) -> EvalSettings:
    """EvalSettings from the command line (--only_eval replaces image_size with the run's)."""
    if args.tag is not None:
        if not args.only_eval:
            # Training evaluates many times; one name cannot tell those groups apart.
            raise ValueError(f"--tag {args.tag} names the result group of --only_eval; periodic evaluations "
                             "during training are named <dataset>_it<iteration>_<hash8>")
        validate_tag(args.tag)
    scorers = scorer_names(args)
    if getattr(args, "save_maps", 0) and not any(SCORERS[name].needs_feature_maps for name in scorers):
        # Only a scorer that maps has maps to draw; saying nothing would leave the user looking for figures.
        raise ValueError(f"--save_maps {args.save_maps} draws the anomaly maps of prototype_map: add it to "
                         f"--evaluator (now {', '.join(scorers)})")
    return EvalSettings(scorers=scorers, image_size=args.image_size,
                        batch_size=args.eval_batch_size, num_workers=args.num_workers, amp=args.amp,
                        few_shot=args.few_shot, seed=args.seed,
                        scorer_options={flag: getattr(args, flag) for flag in scorer_flags()},
                        load_truncated_images=args.load_truncated_images)


def _absolute(path: Optional[str]) -> Optional[str]:
    return None if path is None else os.path.abspath(path)


def settings_record(args: argparse.Namespace, settings: EvalSettings, checkpoint: str,
                    backbone: torch.nn.Module, relational: Optional[torch.nn.Module],
                    iteration: Optional[int], backbone_file: Optional[BackboneFile] = None) -> Dict[str, Any]:
    """Every setting that changes a number (the architecture read off the modules), and the checkpoint;
    with `backbone_file`, the file the backbone was read from (path, SHA-256 and the loaded line)."""
    return {"checkpoint": os.path.abspath(checkpoint), "iteration": iteration,
            **model_facts(backbone, relational), **backbone_record(backbone_file), "scorers": list(settings.scorers),
            "image_size": settings.image_size, "amp": settings.amp, "few_shot": settings.few_shot,
            "seed": settings.seed, **settings.scorer_options, "data_root": _absolute(args.data_root),
            "path_to_txt": _absolute(args.path_to_txt), "source_dir": _absolute(args.source_dir),
            "target_dir": _absolute(args.target_dir)}
