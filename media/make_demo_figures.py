"""Regenerate the README's demo figures (ROC curves, score histograms) from a demo run folder.

    python train.py --demo                       # writes outputs/Digits_resnet18_rel_transformer/
    python media/make_demo_figures.py --run_folder outputs/Digits_resnet18_rel_transformer
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evaluation.plots import plot_roc, plot_score_histograms, read_eval_dir  # noqa: E402


def main() -> None:
    """Read `<run_folder>/eval/` and write `demo_roc.png` and `demo_scores.png` next to this script."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run_folder", default="outputs/Digits_resnet18_rel_transformer")
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--scorers", default="resend,prototype_cosine",
                        help="comma-separated methods to draw (the run may hold more)")
    args = parser.parse_args()
    eval_dir = os.path.join(args.run_folder, "eval")
    if not os.path.isdir(eval_dir):
        raise SystemExit(f"no evaluation folder {eval_dir!r}: run `python train.py --demo` first")
    wanted = args.scorers.split(",")
    records = [r for r in read_eval_dir(eval_dir) if r.scorer in wanted]
    if not records:
        raise SystemExit(f"no results of {wanted} in {eval_dir!r}")
    print(plot_roc(records, os.path.join(args.out, "demo_roc.png")))
    print(plot_score_histograms([r for r in records if r.scorer == wanted[0]],
                                os.path.join(args.out, "demo_scores.png")))


if __name__ == "__main__":
    main()
