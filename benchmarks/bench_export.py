"""CPU latency per image of the exported detector (`train.py --export`) next to the in-repository path.

    python benchmarks/bench_export.py                          # 224 px, batch 1 and 32, fp32 and bf16
    python benchmarks/bench_export.py --batches 1 8 --dtypes fp32 --threads 4

Writes a random ResNet-18 + relational checkpoint (the paper's 4 blocks, 12 heads; no download),
generated JPEGs of `--classes` known classes, and exports it with the project's own export function
(the one `train.py --export` runs). Then both paths score the same decoded images, `--batch` at a
time, from the PIL image to the scores:

- repository: `NoveltyDetector.score` (eval_transform, the BatchNorm-folded backbone, the resend
  scorer against the class prototypes), with `amp="bf16"` for the bf16 rows;
- exported: the .pt2 program read back with `load_exported` (Pillow resize to the export's size,
  then the program), run under `torch.autocast("cpu", dtype=torch.bfloat16)` for the bf16 rows (the
  file itself is float32; autocast applies to the exported graph's ATen calls).

bf16 rows run only where the CPU has native bf16 (AVX512-BF16 or AMX). JPEG decoding is left out
of both. Each figure is the median over `--repeats` passes (after one warm-up pass) of the time to
score all `--images` images, divided by their number. Random weights do not change the time.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluation.api import NoveltyDetector  # noqa: E402
from evaluation.export import export_detector, load_exported  # noqa: E402
from models.backbone import ResNetBackbone  # noqa: E402
from models.checkpoint import save_model_folder  # noqa: E402
from models.relational import RelationalTransformer  # noqa: E402


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The benchmark's sizes; the defaults take a couple of minutes on 2 cores."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image_size", type=int, default=224, help="export and evaluation input size")
    parser.add_argument("--gen_size", type=int, default=256, help="side of the generated JPEGs")
    parser.add_argument("--classes", type=int, default=6, help="known classes (prototypes)")
    parser.add_argument("--support_per_class", type=int, default=4)
    parser.add_argument("--images", type=int, default=32, help="images scored per timed pass")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="images per call")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per row (after one warm-up)")
    parser.add_argument("--depth", type=int, default=4, help="relational blocks")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (otherwise bf16 is emulated and the rows mean nothing)."""
    return torch.backends.mkldnn.is_available() and (torch.cpu._is_avx512_bf16_supported()
                                                     or torch.cpu._is_amx_tile_supported())


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (or 'unknown')."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def write_images(folder: Path, n_images: int, side: int, rng: np.random.Generator, label: str) -> List[Path]:
    """Smooth random JPEGs (they compress and decode like photos), `n_images` of them in `folder/label`."""
    paths = []
    for index in range(n_images):
        path = folder / label / f"{index:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((side, side), Image.BICUBIC).save(path, quality=90)
        paths.append(path)
    return paths


def seconds_per_image(score: Callable[[List[Image.Image]], object], images: List[Image.Image], batch: int,
                      repeats: int) -> float:
    """Median over `repeats` passes (one warm-up first) of the time to score `images`, per image."""
    def one_pass() -> float:
        start = time.perf_counter()
        for first in range(0, len(images), batch):
            score(images[first:first + batch])
        return time.perf_counter() - start

    one_pass()
    return statistics.median(one_pass() for _ in range(repeats)) / len(images)


def main(argv: Sequence[str]) -> None:
    """Build, export, time both paths, print the table."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    dtypes = [dtype for dtype in args.dtypes if dtype == "fp32" or cpu_has_bf16()]
    skipped = sorted(set(args.dtypes) - set(dtypes))
    with tempfile.TemporaryDirectory() as work_dir:
        work = Path(work_dir)
        save_model_folder(str(work / "checkpoint"), ResNetBackbone("resnet18", weights=None),
                          RelationalTransformer(feat_dim=512, n_outputs=1, depth=args.depth), iteration=0)
        support = [(str(path), label) for label in range(args.classes)
                   for path in write_images(work / "support", args.support_per_class, args.gen_size, rng,
                                            f"class_{label}")]
        queries = [Image.open(path).convert("RGB")
                   for path in write_images(work / "queries", args.images, args.gen_size, rng, "any")]
        def repository_detector(dtype: str) -> NoveltyDetector:
            return NoveltyDetector.from_folder(str(work / "checkpoint"), image_size=args.image_size, n_heads=12,
                                               verbose=False, amp="bf16" if dtype == "bf16" else "none")

        # The export fits the fp32 detector's prototypes itself; the bf16 one is fitted on the same images.
        detectors = {"fp32": repository_detector("fp32")}
        start = time.perf_counter()
        out_path = str(work / "detector.pt2")
        export_detector(detectors["fp32"], support, [f"class_{label}" for label in range(args.classes)], out_path,
                        {"benchmark": "benchmarks/bench_export.py"})
        export_seconds = time.perf_counter() - start
        size_mb = Path(out_path).stat().st_size / 1e6
        exported = load_exported(out_path)
        if "bf16" in dtypes:
            detectors["bf16"] = repository_detector("bf16").fit([path for path, _ in support],
                                                                [label for _, label in support])

        print(f"CPU: {cpu_name()}, {args.threads} torch threads; torch {torch.__version__}")
        print(f"{args.image_size} px, {args.classes} known classes, {args.images} images per pass, relational depth "
              f"{args.depth}; median of {args.repeats} passes")
        print(f"export (fit + torch.export + save + check): {export_seconds:.1f} s, file {size_mb:.1f} MB")
        if skipped:
            print(f"skipped {', '.join(skipped)}: this CPU has no native bf16")
        print()
        print(f"{'dtype':<6} {'batch':>5} {'repository ms/img':>18} {'exported ms/img':>16} {'speed-up':>9} "
              f"{'max |normality diff|':>21}")
        for dtype in dtypes:
            detector = detectors[dtype]
            autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")

            def run_exported(images: List[Image.Image]) -> Dict[str, torch.Tensor]:
                with autocast:
                    return exported.score(images)

            gap = float((run_exported(queries)["normality"].float() - detector.score(queries).normality).abs().max())
            for batch in args.batches:
                repository = seconds_per_image(detector.score, queries, batch, args.repeats) * 1e3
                program = seconds_per_image(run_exported, queries, batch, args.repeats) * 1e3
                print(f"{dtype:<6} {batch:>5} {repository:>18.2f} {program:>16.2f} {repository / program:>8.2f}x "
                      f"{gap:>21.2g}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
