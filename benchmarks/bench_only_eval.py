"""Process wall time of `train.py --only_eval` as a user runs it, with the per-phase seconds it records.

    python benchmarks/bench_only_eval.py                                # PACS ArtPainting size, cuda if there
    python benchmarks/bench_only_eval.py --amps none bf16 --repeats 2   # both precisions, a warm second run
    python benchmarks/bench_only_eval.py --device cpu --support 60 --scored 40 --evaluators default

Generates a Folder benchmark of the size of PACS_DG with ArtPainting as the target (3124 support
images of 6 known classes, 2048 scored images of which a fifth belong to a seventh, unknown class;
227 px JPEGs as in PACS) and a random ReSeND checkpoint in the authors' format, then runs
`train.py --only_eval` in a fresh process per configuration: the default scorer and
`--evaluator all`. Each row is one process: its wall time from start to exit (imports, CUDA
start-up and worker shutdown included) and the phases its result group's manifest records (load:
checkpoint and lists up to the first image; features; scoring; writing). "after load" is features +
scoring + writing, the part the evaluation itself controls. Random weights do not change the time
of any phase. The evaluation-speed targets (one H100, 16 cores): default <= 6 s wall and <= 3 s
after load, `--evaluator all` <= 15 s wall.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.backbone import ResNetBackbone  # noqa: E402
from models.checkpoint import save_model_folder  # noqa: E402
from models.relational import RelationalTransformer  # noqa: E402

KNOWN_CLASSES = 6
EVALUATORS = {"default": [], "all": ["--evaluator", "all"]}


def write_tree(root: Path, n_support: int, n_scored: int, side: int, seed: int) -> None:
    """`root/source/<class>/` (known classes) and `root/target/<class>/` (known + one unknown), smooth JPEGs."""
    rng = np.random.default_rng(seed)
    coarse = 8  # a smooth random picture compresses and decodes like a photo, unlike white noise

    def save(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (coarse, coarse, 3), dtype=np.uint8)
        Image.fromarray(small).resize((side, side), Image.BICUBIC).save(path, quality=90)

    for index in range(n_support):
        save(root / "source" / f"class_{index % KNOWN_CLASSES}" / f"{index:05d}.jpg")
    n_unknown = n_scored // 5
    for index in range(n_scored):
        label = KNOWN_CLASSES if index < n_unknown else index % KNOWN_CLASSES
        save(root / "target" / f"class_{label}" / f"{index:05d}.jpg")


def write_checkpoint(folder: Path, depth: int, seed: int) -> None:
    """A random ResNet-18 + relational module of `depth` blocks in the authors' file format."""
    torch.manual_seed(seed)
    save_model_folder(str(folder), ResNetBackbone("resnet18", weights=None),
                      RelationalTransformer(feat_dim=512, n_outputs=1, depth=depth), iteration=0)


def run_once(work: Path, name: str, amp: str, args: argparse.Namespace, repeat: int) -> Dict[str, float]:
    """One `train.py --only_eval` process; its wall seconds and the manifest's phase seconds."""
    tag = f"bench_{name}_{amp}_{repeat}"
    command = [sys.executable, str(ROOT / "train.py"), "--only_eval", "--dataset", "Folder",
               "--source_dir", str(work / "data" / "source"), "--target_dir", str(work / "data" / "target"),
               "--checkpoint_folder_path", str(work / "checkpoint"), "--image_size", str(args.image_size),
               "--device", args.device, "--amp", amp, "--tag", tag, "--quiet", *EVALUATORS[name]]
    if args.num_workers is not None:
        command += ["--num_workers", str(args.num_workers)]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"train.py --only_eval ({name}, amp {amp}) failed:\n{done.stderr[-3000:]}")
    manifest = json.loads((work / "checkpoint" / "eval" / tag / "manifest.json").read_text())
    return {"wall": wall, **manifest["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--support", type=int, default=3124, help="support images (6 known classes)")
    parser.add_argument("--scored", type=int, default=2048, help="scored images (a fifth of them unknown)")
    parser.add_argument("--side", type=int, default=227, help="side of the generated JPEGs")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--depth", type=int, default=4, help="relational blocks of the random checkpoint")
    parser.add_argument("--evaluators", nargs="+", default=list(EVALUATORS), choices=list(EVALUATORS))
    parser.add_argument("--amps", nargs="+", default=["none"], choices=["none", "bf16", "fp16"])
    parser.add_argument("--num_workers", type=int, default=None, help="train.py's --num_workers (default: its own)")
    parser.add_argument("--repeats", type=int, default=1, help="processes per configuration")
    parser.add_argument("--work_dir", default=None, help="where the data and checkpoint go (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.work_dir) as scratch:
        work = Path(scratch)
        start = time.perf_counter()
        write_tree(work / "data", args.support, args.scored, args.side, args.seed)
        write_checkpoint(work / "checkpoint", args.depth, args.seed)
        where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else \
            f"CPU, {os.cpu_count()} cores"
        print(f"{args.support} support + {args.scored} scored {args.side} px JPEGs, {KNOWN_CLASSES} known classes "
              f"(written in {time.perf_counter() - start:.1f} s); {where}; torch {torch.__version__}")
        print(f"{'evaluator':<10} {'amp':<5} {'run':>3} {'wall s':>8} {'load':>7} {'features':>9} {'scoring':>8} "
              f"{'writing':>8} {'after load':>11}")
        for name in args.evaluators:
            for amp in args.amps:
                for repeat in range(args.repeats):
                    s = run_once(work, name, amp, args, repeat)
                    after = s.get("features", 0.0) + s.get("scoring", 0.0) + s.get("writing", 0.0)
                    row = (f"{name:<10} {amp:<5} {repeat + 1:>3} {s['wall']:8.2f} {s.get('load', 0.0):7.2f} "
                           f"{s.get('features', 0.0):9.2f} {s.get('scoring', 0.0):8.2f} {s.get('writing', 0.0):8.2f} "
                           f"{after:11.2f}")
                    print(row, flush=True)


if __name__ == "__main__":
    main()
