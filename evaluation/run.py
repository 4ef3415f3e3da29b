"""`train.py --only_eval` and the periodic evaluation: splits -> evaluate_split -> files and table."""
import argparse
import os
from typing import Any, Dict, List, Optional, Tuple

import torch

from datasets.benchmarks import EVAL_DATASETS, EvalSplit, get_eval_split, resolve_targets
from evaluation.evaluate import (RELATIONAL_SCORERS, EvalResult, EvalSettings, evaluate_split,
                                 format_table, log_to_tensorboard, summary_files, validate_split,
                                 write_eval_outputs)
from evaluation.scorers import SCORERS
from models.backbone import ResNetBackbone
from models.checkpoint import load_model_folder
from utils.distributed import is_main_process
from utils.logger import TensorBoardWriter


def scorer_names(args: argparse.Namespace) -> Tuple[str, ...]:
    """The scorers to run: `--evaluator` (a list, or `all`), else the one the authors' flags select."""
    if args.most_significant_prototypes and args.knn_distance_evaluator:
        raise ValueError("choose one of --most_significant_prototypes and --knn_distance_evaluator")
    if args.evaluator:
        if args.evaluator == "all":
            names = [name for name in SCORERS if not (args.backbone_only and name in RELATIONAL_SCORERS)]
        else:
            names = [name.strip() for name in args.evaluator.split(",") if name.strip()]
        unknown = [name for name in names if name not in SCORERS]
        if unknown or not names:
            raise ValueError(f"unknown --evaluator {', '.join(unknown) or repr(args.evaluator)}; "
                             f"valid: {', '.join(SCORERS)}, all")
        return tuple(dict.fromkeys(names))
    if args.backbone_only:
        raise ValueError("--backbone_only scores with post-hoc baselines: give --evaluator "
                         f"(e.g. all or {', '.join(n for n in SCORERS if n not in RELATIONAL_SCORERS)})")
    if args.most_significant_prototypes:
        return ("resend_msp",)
    if args.knn_distance_evaluator:
        return ("resend_knn",)
    return ("resend",)


def eval_settings(args: argparse.Namespace) -> EvalSettings:
    """EvalSettings from the command line."""
    if args.few_shot is not None and args.few_shot <= 0:
        raise ValueError(f"--few_shot must be a positive number of images per class, got {args.few_shot}")
    if args.NNK <= 0:
        raise ValueError(f"--NNK must be positive, got {args.NNK}")
    if args.eval_batch_size <= 0:
        raise ValueError(f"--eval_batch_size must be positive, got {args.eval_batch_size}")
    return EvalSettings(scorers=scorer_names(args), image_size=args.image_size,
                        batch_size=args.eval_batch_size, num_workers=args.num_workers, amp=args.amp,
                        few_shot=args.few_shot, seed=args.seed, nnk=args.NNK)


def load_splits(args: argparse.Namespace, dataset: str, target: Optional[str]) -> List[EvalSplit]:
    """Every split to evaluate, each checked (folders, lists, image files) before any scoring."""
    splits = []
    for name in resolve_targets(dataset, target):
        split = get_eval_split(dataset, name, args.data_root, path_to_txt=args.path_to_txt,
                               source_dir=args.source_dir, target_dir=args.target_dir)
        validate_split(split)
        splits.append(split)
    return splits


def settings_record(args: argparse.Namespace, settings: EvalSettings, checkpoint: str,
                    network: str, objective: str, iteration: Optional[int]) -> Dict[str, Any]:
    """What the JSON records about how the numbers were made."""
    return {"checkpoint": os.path.abspath(checkpoint), "iteration": iteration, "network": network,
            "objective": objective, "scorers": list(settings.scorers), "image_size": settings.image_size,
            "amp": settings.amp, "few_shot": settings.few_shot, "seed": settings.seed,
            "NNK": settings.nnk, "data_root": os.path.abspath(args.data_root),
            "path_to_txt": args.path_to_txt}


def evaluate_splits(splits: List[EvalSplit], backbone: ResNetBackbone, relational: Optional[torch.nn.Module],
                    settings: EvalSettings, device: torch.device) -> List[EvalResult]:
    """Evaluate every split (sharded over processes); the results exist on rank 0 only."""
    return [result for split in splits
            for result in evaluate_split(backbone, relational, split, settings, device)]


def write_results(results: List[EvalResult], out_folder: str, record: Dict[str, Any],
                  tb_writer: Optional[TensorBoardWriter], step: int) -> None:
    """`<out_folder>/eval/*` files and TensorBoard entries of finished evaluations (rank 0)."""
    if not is_main_process() or not results:
        return
    eval_dir = os.path.join(out_folder, "eval")
    for result in results:
        write_eval_outputs(result, eval_dir, record)
        if tb_writer is not None:
            log_to_tensorboard(tb_writer, result, step)
    if len(results) > 1:
        summary_files(results, eval_dir)


def run_only_eval(args: argparse.Namespace) -> List[EvalResult]:
    """Load the checkpoint folder, evaluate the requested targets, print the table."""
    if args.dataset not in EVAL_DATASETS:
        raise ValueError(f"--only_eval needs a benchmark --dataset, one of {list(EVAL_DATASETS)}; "
                         f"got {args.dataset!r}")
    settings = eval_settings(args)
    folder = args.checkpoint_folder_path
    if args.backbone_only:
        # The baselines on the backbone alone (ImageNet weights by default), without any checkpoint.
        weights = None if args.backbone_weights == "none" else args.backbone_weights
        backbone = ResNetBackbone(args.network, weights=weights).to(args.device).eval()
        relational, objective, network, iteration = None, "none", args.network, None
    else:
        model = load_model_folder(folder, n_heads=args.transf_n_heads, device=args.device)
        backbone, relational, objective = model.backbone, model.relational, model.objective
        network, iteration = model.network, model.iteration
    splits = load_splits(args, args.dataset, args.target)
    record = settings_record(args, settings, folder, network, objective, iteration)
    if args.backbone_only:
        record["backbone_weights"] = args.backbone_weights
    results = evaluate_splits(splits, backbone, relational, settings, args.device)
    # Files are written only once every split has been scored: a failure leaves no partial output.
    tb_writer = TensorBoardWriter(os.path.join(folder, "tensorboard"), enabled=is_main_process())
    try:
        write_results(results, folder, record, tb_writer, step=iteration or 0)
    finally:
        tb_writer.close()
    if is_main_process():
        print(format_table(results))
        print(f"results written to {os.path.join(folder, 'eval')}")
    return results

