"""Training throughput with the two input pipelines: augmentation in the DataLoader workers (PIL, per image)
or on the training device (`--device_augment`: workers read bytes, nvJPEG decodes, batches are augmented on
the GPU). Prints pairs/s compute-only (synthetic tensors already on the device) and end to end on a
generated JPEG tree, for fp32 and bf16, and the share of each step spent waiting for data.

    python benchmarks/bench_train_gpu.py                        # CUDA: 224 px, 256 pairs per step
    python benchmarks/bench_train_gpu.py --device cpu --image_size 32 --pairs 8 --steps 3 --images 24  # smoke

Targets (one H100, 16 cores): end to end >= 90% of compute-only in fp32 and bf16, and bf16 end to end
>= 1.4x fp32 end to end. On the CPU the figures only show that the script runs.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# Runnable as `python benchmarks/bench_train_gpu.py` from anywhere: the project packages live at the repo root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.augment import AugmentSettings  # noqa: E402
from train import get_args_parser  # noqa: E402
from training.engine import backward_micro_batch  # noqa: E402
from training.main import build_model  # noqa: E402
from training.pair_stream import PairStream  # noqa: E402
from training.settings import ModelSettings, Objective, Optimisation  # noqa: E402
from utils.optim import build_optimizer  # noqa: E402
from utils.precision import grad_scaler, use_tf32  # noqa: E402


def jpeg_tree(root: Path, n_images: int, n_classes: int, size: tuple, seed: int = 0) -> list:
    """(path, label) samples of a generated tree of smooth random JPEGs (what a decoder and resampler see)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    samples = []
    for i in range(n_images):
        label = i % n_classes
        folder = root / f"class{label:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        phases = rng.uniform(0, 6, size=3)
        pixels = np.stack([127 + 100 * np.sin(x / (9 + c) + phases[c]) * np.cos(y / (13 + c)) for c in range(3)], -1)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        samples.append((str(path), label))
    return samples


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so that wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace, amp: str, pipeline: str, samples: list) -> tuple:
    """(pairs/s, share of the time waiting for data) of `args.steps` timed steps after `args.warmup`."""
    device = torch.device(args.device)
    flags = get_args_parser().parse_args(["--backbone_weights", "none", "--amp", amp, "--device", args.device])
    objective, optimisation = Objective.from_args(flags), Optimisation.from_args(flags)
    model = build_model(ModelSettings.from_args(flags), objective, device).train()
    optimizer = build_optimizer(model.parameters(), "lars", lr=0.008, momentum=0.9, weight_decay=5e-4)
    scaler = grad_scaler(device, amp)
    settings = AugmentSettings(args.image_size, 0.8, 1.0, 0.5, 0.8, 0.5, 0.1)
    if pipeline == "compute":
        gen = torch.Generator().manual_seed(0)
        fixed = [torch.randn(args.pairs, 3, args.image_size, args.image_size, generator=gen).to(device)
                 for _ in range(2)]
        batches = iter(lambda: (0, (fixed[0], fixed[1], None, torch.randint(0, 2, (args.pairs,)))), None)
    else:
        stream = PairStream(samples, settings.pil_transform(), 20, True, args.pairs, args.workers, 0, 0, 1,
                            pin_memory=device.type == "cuda",
                            device_augment=(settings, device) if pipeline == "device" else None)
        batches = stream.batches(0)
    waited = 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            synchronize(device)
            start, waited = time.perf_counter(), 0.0
        before = time.perf_counter()
        _, (images_a, images_b, _, relation) = next(batches)
        images_a = images_a.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        images_b = images_b.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        synchronize(device)
        waited += time.perf_counter() - before
        optimizer.zero_grad(set_to_none=True)
        backward_micro_batch(model, images_a, images_b, relation.to(device), objective, optimisation, scaler,
                             device, last=True)
        scaler.step(optimizer)
        scaler.update()
    synchronize(device)
    elapsed = time.perf_counter() - start
    return args.steps * args.pairs / elapsed, waited / elapsed


def main() -> None:
    """Print one row per (precision, pipeline) and the targets."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--pairs", type=int, default=256, help="pairs per step")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--images", type=int, default=2000, help="images in the generated tree")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--source_size", type=int, nargs=2, default=[400, 350], help="width height of the JPEGs")
    parser.add_argument("--workers", type=int, default=14, help="DataLoader workers")
    parser.add_argument("--amps", nargs="+", default=["none", "bf16"])
    args = parser.parse_args()
    use_tf32(True)  # fp32 as train.py runs it on CUDA by default (no effect on the CPU)
    if args.device == "cpu":
        torch.set_flush_denormal(True)  # as train.py does on the CPU
    with tempfile.TemporaryDirectory() as tree:
        samples = jpeg_tree(Path(tree), args.images, args.classes, tuple(args.source_size))
        where = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
        print(f"{where}, torch {torch.__version__}; {args.image_size} px, {args.pairs} pairs per step, "
              f"{args.workers} workers, {args.images} JPEGs of {args.source_size[0]}x{args.source_size[1]}")
        print(f"{'amp':>5} {'pipeline':>9} {'pairs/s':>9} {'of compute':>11} {'waiting':>8}")
        figures = {}
        for amp in args.amps:
            for pipeline in ("compute", "workers", "device"):
                rate, waiting = run(args, amp, pipeline, samples)
                figures[amp, pipeline] = rate
                print(f"{amp:>5} {pipeline:>9} {rate:9.1f} {rate / figures[amp, 'compute']:10.0%} {waiting:8.0%}",
                      flush=True)
        for amp in args.amps:
            share = figures[amp, "device"] / figures[amp, "compute"]
            print(f"target: {amp} end to end (device) >= 90% of compute-only: {share:.0%} "
                  f"{'met' if share >= 0.9 else 'NOT met'}")
        if {"none", "bf16"} <= set(args.amps):
            gain = figures["bf16", "device"] / figures["none", "device"]
            print(f"target: bf16 end to end >= 1.4x fp32 end to end: {gain:.2f}x {'met' if gain >= 1.4 else 'NOT met'}")


if __name__ == "__main__":
    main()
