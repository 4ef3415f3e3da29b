"""Regenerate the README's demo figures (ROC curves, score histograms) from a demo run folder.

    python train.py --demo                       # writes outputs/Digits_resnet18_rel_transformer/
    python media/make_demo_figures.py --run_folder outputs/Digits_resnet18_rel_transformer

demo_roc.png has one panel per target (seen, novel) with a curve per method of --scorers; demo_scores.png
the known/unknown histograms of the first of them, one panel per target. (The run's own figures,
`figures/roc.png` and the group's `roc_Digits.png`, show every method it evaluated.)

The anomaly-map figure (media/demo_maps.png) comes from an evaluation of the same run at 128 px, where
the backbone's last feature map has 4 x 4 locations (at the demo's 32 px it has one):

    python train.py --only_eval --dataset Digits --target novel --evaluator prototype_map --save_maps 4 \
        --image_size 128 --tag maps128 --checkpoint_folder_path outputs/Digits_resnet18_rel_transformer
    python media/make_demo_figures.py --run_folder outputs/Digits_resnet18_rel_transformer --maps_group maps128
"""
import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evaluation.groups import EVAL_DIR, latest_group, read_manifest  # noqa: E402
from evaluation.plots import plot_roc, plot_score_histograms, read_eval_dir  # noqa: E402


def main() -> None:
    """Read a result group of `<run_folder>/eval/` and write `demo_roc.png` and `demo_scores.png`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run_folder", default="outputs/Digits_resnet18_rel_transformer")
    parser.add_argument("--group", default=None,
                        help="result group under <run_folder>/eval/ (default: the most recently written one)")
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--scorers", default="resend,prototype_cosine",
                        help="comma-separated methods to draw (the run may hold more)")
    parser.add_argument("--maps_group", default=None,
                        help="also copy this result group's maps_Digits_novel.png (written with --save_maps) to "
                             "demo_maps.png")
    args = parser.parse_args()
    if args.group is not None:
        group = os.path.join(args.run_folder, EVAL_DIR, args.group)
    else:
        try:
            group = latest_group(args.run_folder).path
        except FileNotFoundError as error:
            raise SystemExit(f"{error}: run `python train.py --demo` first") from None
    print(f"results from {group}")
    wanted = args.scorers.split(",")
    try:
        records = [r for r in read_eval_dir(group) if r.scorer in wanted]
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    if not records:
        raise SystemExit(f"no results of {wanted} in {group!r}")
    # The files are read in name order; the figures show the targets as evaluated and the methods as asked.
    targets = (read_manifest(group) or {}).get("targets", [])
    records.sort(key=lambda r: (targets.index(r.target) if r.target in targets else len(targets), wanted.index(r.scorer)))
    print(plot_roc(records, os.path.join(args.out, "demo_roc.png")))
    print(plot_score_histograms([r for r in records if r.scorer == wanted[0]],
                                os.path.join(args.out, "demo_scores.png")))
    if args.maps_group is not None:
        source = os.path.join(args.run_folder, EVAL_DIR, args.maps_group, "maps_Digits_novel.png")
        if not os.path.isfile(source):
            raise SystemExit(f"error: {source} not found: evaluate with --evaluator prototype_map --save_maps N")
        print(shutil.copyfile(source, os.path.join(args.out, "demo_maps.png")))


if __name__ == "__main__":
    main()
