"""Write the support/scored lists this project derives, in the authors' list-file format and names.

Usage: python -m datasets.export_lists --dataset D --target T --data_root R --out DIR
writes DIR/<dataset>/<support list>.txt and DIR/<dataset>/<scored list>.txt for each target, so
that `--path_to_txt DIR` reads back exactly the same samples.
"""
import argparse
import os
import sys

from datasets.benchmarks import (BENCHMARKS, get_eval_split, list_file_names, list_root,
                                 resolve_targets)
from datasets.image_lists import write_list_file


def export_lists(dataset: str, target: str | None, data_root: str, out_dir: str) -> list[str]:
    """Derive the lists of every requested target, then write them; return the written paths."""
    # Derive everything first so that bad input fails before any file is written.
    splits = [get_eval_split(dataset, name, data_root)
              for name in resolve_targets(dataset, target)]
    root = list_root(dataset, data_root)
    written = []
    for split in splits:
        support_name, scored_name = list_file_names(dataset, split.target)
        for name, samples in ((support_name, split.support), (scored_name, split.scored)):
            path = os.path.join(out_dir, dataset, name)
            if path in written:  # the single-source sets share one Source.txt across targets
                continue
            write_list_file(path, samples, root)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True,
                        choices=[name for name, bench in BENCHMARKS.items() if not bench.user_folders])
    parser.add_argument("--target", default=None,
                        help="a target of the dataset, or 'all' (default: the only target)")
    parser.add_argument("--data_root", required=True)
    parser.add_argument("--out", required=True, help="folder to write <dataset>/<list>.txt into")
    args = parser.parse_args(argv)
    for path in export_lists(args.dataset, args.target, args.data_root, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
