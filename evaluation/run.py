"""`train.py --only_eval`: the run folder's settings -> splits -> engine -> table -> result group."""
import argparse
import dataclasses
import os
import time
from typing import Any, Dict, List, Optional, Set

from datasets.benchmarks import benchmark_names
from evaluation.evaluate import EvalResult, evaluate_splits, load_splits
from evaluation.groups import EVAL_DIR, check_slot, read_manifest
from evaluation.report import format_table, group_identity, phase_seconds, say, tensorboard_extra, write_results
from evaluation.run_settings import check_against_checkpoint, loaded_from, loaded_line, resolve_run_settings
from evaluation.settings import eval_settings, settings_record
from models.backbone import ResNetBackbone
from models.backbone_file import BackboneFile, load_backbone_file
from models.checkpoint import CheckpointError, load_model_folder
from utils.distributed import is_main_process


def explicit_flags_of(args: argparse.Namespace) -> Set[str]:
    """The flags given on the command line (train.parse_command_line records them)."""
    explicit = getattr(args, "explicit_flags", None)
    if explicit is None:
        # Without it a default could not be told from a choice, and the run's settings would be ignored.
        raise ValueError("--only_eval needs args.explicit_flags (which flags were given); parse the command "
                         "line with train.parse_command_line")
    return set(explicit)


def run_only_eval(args: argparse.Namespace) -> List[EvalResult]:
    """Load the checkpoint folder with the run's settings, evaluate, print the table, write one group."""
    if args.dataset not in benchmark_names():
        raise ValueError(f"--only_eval needs a benchmark --dataset, one of {', '.join(benchmark_names())}; "
                         f"got {args.dataset!r}")
    start = time.perf_counter()
    explicit = explicit_flags_of(args)
    settings = eval_settings(args)
    folder = args.checkpoint_folder_path
    backbone_file: Optional[BackboneFile] = None
    if args.backbone_only and args.backbone_checkpoint is not None:
        # The baselines on the backbone of a file (e.g. a classifier fine-tuned on the known classes).
        backbone, backbone_file = load_backbone_file(args.backbone_checkpoint)
        if "network" in explicit and args.network != backbone_file.network:
            raise CheckpointError(f"--network {args.network} contradicts --backbone_checkpoint "
                                  f"{args.backbone_checkpoint}, which holds a {backbone_file.network}")
        say(backbone_file.describe())
        backbone = backbone.to(args.device)
        relational, iteration = None, None
        provenance: Dict[str, Any] = {}
    elif args.backbone_only:
        # The baselines on the backbone alone (ImageNet weights by default), without any checkpoint.
        weights = None if args.backbone_weights == "none" else args.backbone_weights
        backbone = ResNetBackbone(args.network, weights=weights).to(args.device).eval()
        relational, iteration = None, None
        provenance = {"backbone_weights": args.backbone_weights}
    else:
        if not os.path.isdir(folder):
            raise CheckpointError(f"checkpoint folder not found: {folder}")
        run = resolve_run_settings(folder, {"image_size": args.image_size, "transf_n_heads": args.transf_n_heads},
                                   explicit)
        for line in run.messages:
            say(line)
        model = load_model_folder(folder, n_heads=run.n_heads, device=args.device,
                                  backbone_file=args.backbone_checkpoint)
        check_against_checkpoint(model, vars(args), explicit, run, warn=say)
        say(loaded_line(model))
        backbone, relational, iteration = model.backbone, model.relational, model.iteration
        backbone_file = model.backbone_file
        settings = dataclasses.replace(settings, image_size=run.image_size)
        provenance = {"loaded_from": loaded_from(model), "run_args": run.run_args, "overrides": run.overrides}
    splits = load_splits(args.dataset, args.target, args.data_root, args.path_to_txt, args.source_dir,
                         args.target_dir)
    record = {**settings_record(args, settings, folder, backbone, relational, iteration, backbone_file),
              **provenance}
    name, digest = group_identity("only_eval", args.dataset, [split.target for split in splits], record, args.tag)
    # Refused before the (long) scoring; checked again when the group is written.
    check_slot(os.path.join(folder, EVAL_DIR), name, digest)
    # "load": the model and the image lists, up to the first image through the backbone.
    load_seconds = time.perf_counter() - start
    results = evaluate_splits(splits, backbone, relational, settings, args.device)
    if is_main_process():
        # The table first: whatever fails afterwards, the numbers have been shown.
        print(format_table(results), flush=True)
        phases = phase_seconds(results, load=load_seconds)
        for result in results:
            result.seconds["load"] = round(load_seconds, 3)
        group = write_results(results, folder, record, None, step=iteration or 0, kind="only_eval", tag=args.tag,
                              phases=phases)
        tensorboard_extra(results, os.path.join(folder, "tensorboard"), step=iteration or 0)
        written = read_manifest(group)["seconds"]  # as recorded, with the writing itself
        print("seconds: " + ", ".join(f"{phase} {value:.2f}" for phase, value in written.items()), flush=True)
        print(f"results written to {group}", flush=True)
    return results
