"""`train.py --export PATH`: a checkpoint folder + one benchmark target's support set -> one deployable file."""
import argparse
import os
import time
from typing import Any, Dict

from datasets.benchmarks import benchmark, benchmark_names, dataset_targets, get_eval_split
from datasets.image_lists import check_files_exist
from evaluation.api import NoveltyDetector
from evaluation.evaluate import select_support
from evaluation.export import OUTPUT_NAMES, export_detector
from evaluation.run import explicit_flags_of
from evaluation.settings import scorer_names
from utils.distributed import get_world_size


class ExportUsageError(ValueError):
    """--export combined with settings it cannot honour."""


def check_export_request(args: argparse.Namespace) -> None:
    """Refuse what --export cannot do, before anything is loaded (each a line naming the value)."""
    path = args.export
    if args.only_eval or args.backbone_only or args.demo:
        given = [flag for flag in ("only_eval", "backbone_only", "demo") if getattr(args, flag)]
        raise ExportUsageError(f"--export writes a detector file; it does not combine with --{', --'.join(given)}")
    if get_world_size() > 1:
        raise ExportUsageError("--export runs in one process; start it with python, not torchrun")
    if args.dataset not in benchmark_names():
        raise ExportUsageError(f"--export needs a benchmark --dataset for the support set, one of "
                               f"{', '.join(benchmark_names())}; got {args.dataset!r}")
    targets = dataset_targets(args.dataset)
    if args.target == "all" or (args.target is None and len(targets) > 1):
        raise ExportUsageError(f"--export takes the support set of one target; --target "
                               f"{'all names several' if args.target else 'is not given'} (choose one of "
                               f"{', '.join(targets)}; export one file per target)")
    scorers = scorer_names(args)
    if scorers != ("resend",):
        raise ExportUsageError(f"--export builds the default resend scorer (class prototypes); got "
                               f"{', '.join(scorers)}")
    if args.amp != "none":
        raise ExportUsageError(f"--export writes a float32 program (run it under torch.autocast for bf16); "
                               f"--amp {args.amp} applies to evaluation only")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"--export {path}: folder {parent} does not exist")
    if os.path.lexists(path):
        raise FileExistsError(f"--export {path} already exists; remove it or choose another path "
                              "(an existing file is never overwritten)")


def run_export(args: argparse.Namespace) -> Dict[str, Any]:
    """Load the checkpoint as --only_eval does, fit the resend prototypes on the support set, write the file."""
    check_export_request(args)
    start = time.perf_counter()
    explicit = explicit_flags_of(args)
    folder = args.checkpoint_folder_path
    # Only explicit flags override the run's args.json, as with --only_eval.
    detector = NoveltyDetector.from_folder(
        folder, device=args.device, batch_size=args.eval_batch_size,
        n_heads=args.transf_n_heads if "transf_n_heads" in explicit else None,
        image_size=args.image_size if "image_size" in explicit else None,
        backbone_checkpoint=args.backbone_checkpoint, load_truncated_images=args.load_truncated_images)
    bench = benchmark(args.dataset)
    # The scored side is not exported; a user-folder dataset reads only source_dir.
    target_dir = args.source_dir if bench.user_folders else args.target_dir
    split = get_eval_split(args.dataset, args.target, args.data_root, args.path_to_txt, args.source_dir, target_dir)
    support = select_support(split, args.few_shot, args.seed)
    if not support:
        raise ExportUsageError(f"{split.dataset}/{split.target}: the support set is empty")
    check_files_exist(support)
    provenance = {"dataset": split.dataset, "target": split.target,
                  "data_root": None if bench.user_folders else os.path.abspath(args.data_root),
                  "path_to_txt": None if args.path_to_txt is None else os.path.abspath(args.path_to_txt),
                  "source_dir": None if args.source_dir is None else os.path.abspath(args.source_dir),
                  "few_shot": args.few_shot, "seed": args.seed, "n_support": len(support)}
    class_names = split.class_names[:split.known_classes]
    metadata, gaps = export_detector(detector, support, class_names, args.export, provenance)
    print(f"checked against the in-repository resend scores: max |normality diff| {gaps['normality']:.2g}, "
          f"max |similarity diff| {gaps['similarity']:.2g}, same nearest class", flush=True)
    print(f"exported {len(class_names)} known classes ({len(support)} support images, "
          f"{metadata['preprocessing']['image_size']} px) to {args.export} in {time.perf_counter() - start:.1f} s; "
          f"outputs per image: {', '.join(OUTPUT_NAMES)}", flush=True)
    return metadata
