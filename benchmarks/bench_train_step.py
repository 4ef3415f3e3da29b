"""CPU seconds per training iteration of ReSeND (model, loss, optimizer step), warm-up excluded.

    python benchmarks/bench_train_step.py                         # 64 px x 32 pairs and 32 px x 64 pairs
    python benchmarks/bench_train_step.py --sizes 64:32 --optimizers lars --amps bf16
    python benchmarks/bench_train_step.py --train_py 20 --num_workers 1   # + full train.py runs with data loading

Each row times the real step of `training.engine`: the model from `build_model` (ResNet-18 +
relational transformer, channels_last weights), `backward_micro_batch` (autocast forward of both
halves in one backbone call, `relation_loss`, backward) and the `build_optimizer` step through the
grad scaler, on a fixed random pair batch (no data loading). Variants: optimizer (lars, sgd), amp
(fp32, bf16 autocast), memory format (channels_last as in training, or NCHW), and
`torch.set_flush_denormal` on/off. The "saturated head" rows put the L2 head at a large negative
bias, as a run collapsed to "same class" has it: sigmoid(10 * logit) ~ exp(-90) is then a denormal
float, the whole backward pass carries denormals, and that is where flushing them matters (a
positive bias would not do: sigmoid rounds to exactly 1.0 and the gradient is exactly 0).
With `--train_py N`, `train.py` itself runs N iterations on a generated Folder
tree (JPEGs, augmentation, DataLoader workers) and the logged s/it of its second half is reported.
"""
import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Tuple

import torch

# Runnable as `python benchmarks/bench_train_step.py` from anywhere: the project packages live at the repo root.
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_eval import write_textured_tree  # noqa: E402
from train import get_args_parser  # noqa: E402
from training.engine import backward_micro_batch  # noqa: E402
from training.main import build_model  # noqa: E402
from training.settings import ModelSettings, Objective, Optimisation  # noqa: E402
from utils.optim import build_optimizer, set_lr  # noqa: E402
from utils.precision import grad_scaler  # noqa: E402

CPU = torch.device("cpu")


def model_args(amp: str) -> argparse.Namespace:
    """train.py's own defaults (ResNet-18, L2, relational depth 4) with random init, `amp`, one process."""
    return get_args_parser().parse_args(["--backbone_weights", "none", "--amp", amp, "--device", "cpu"])


def time_steps(image_size: int, pairs: int, optimizer_name: str, amp: str, channels_last: bool,
               flush_denormal: bool, head_bias: float, warmup: int, iterations: int, seed: int) -> float:
    """Median seconds of one training iteration (after `warmup` untimed ones)."""
    torch.manual_seed(seed)
    args = model_args(amp)
    objective, optimisation = Objective.from_args(args), Optimisation.from_args(args)
    model = build_model(ModelSettings.from_args(args), objective, CPU)
    if not channels_last:
        model = model.to(memory_format=torch.contiguous_format)
    if head_bias:
        with torch.no_grad():
            model.relational.head.bias.fill_(head_bias)
    model.train()
    optimizer = build_optimizer(model.parameters(), optimizer_name, lr=0.008, momentum=0.9, weight_decay=5e-4)
    scaler = grad_scaler(CPU, amp)
    gen = torch.Generator().manual_seed(seed)
    images_a = torch.randn(pairs, 3, image_size, image_size, generator=gen)
    images_b = torch.randn(pairs, 3, image_size, image_size, generator=gen)
    relation = torch.randint(0, 2, (pairs,), generator=gen)

    def step() -> None:
        set_lr(optimizer, 0.008)
        optimizer.zero_grad(set_to_none=True)
        a, b = images_a, images_b
        if channels_last:
            # As the training loop does with every batch it receives.
            a = a.contiguous(memory_format=torch.channels_last)
            b = b.contiguous(memory_format=torch.channels_last)
        backward_micro_batch(model, a, b, relation, objective, optimisation, scaler, CPU, last=True)
        scaler.step(optimizer)
        scaler.update()

    # A process-wide switch: every variant sets it explicitly.
    torch.set_flush_denormal(flush_denormal)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def parse_size(text: str) -> Tuple[int, int]:
    """'64:32' -> (image size 64, 32 pairs)."""
    try:
        size, pairs = (int(part) for part in text.split(":"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected <image_size>:<pairs>, e.g. 64:32; got {text!r}") from exc
    return size, pairs


def train_py_run(work: Path, image_size: int, pairs: int, amp: str, iterations: int, num_workers: int,
                 threads: int) -> Tuple[float, float]:
    """(wall seconds of `train.py`, logged s/it of its second half) for N iterations on a generated tree."""
    out = work / f"run_{image_size}_{pairs}_{amp}_{num_workers}"
    half = max(1, iterations // 2)
    command = [sys.executable, str(REPO / "train.py"), "--dataset", "Folder", "--train_dir", str(work / "train"),
               "--image_size", str(image_size), "--batch_size", str(pairs), "--iterations", str(2 * half),
               "--num_workers", str(num_workers), "--backbone_weights", "none", "--eval_dataset", "none",
               "--amp", amp, "--device", "cpu", "--checkpoint_folder_path", str(out),
               "--log_period", str(half), "--save_period", str(2 * half), "--warmup", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=str(REPO))
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    rates = re.findall(r"it (\d+)/\d+ .* ([\d.]+) s/it", proc.stdout)
    if not rates:
        raise RuntimeError(f"no 's/it' line in train.py's output:\n{proc.stdout[-2000:]}")
    return wall, float(rates[-1][1])


def step_table(args: argparse.Namespace) -> None:
    """One row per (size, optimizer, amp, memory format, flush_denormal), plus the saturated-head rows."""
    header = (f"{'px':>4} {'pairs':>5} {'optim':>5} {'amp':>5} {'format':>13} {'flush':>5} {'head':>9} {'s/it':>7} "
              f"{'pairs/s':>8} {'load':>5}")
    print(header)
    print("-" * len(header))
    rows: List[tuple] = []
    for (size, pairs), opt, amp, fmt, flush in itertools.product(args.sizes, args.optimizers, args.amps,
                                                                 args.formats, args.flush_denormal):
        rows.append((size, pairs, opt, amp, fmt, flush, 0.0))
    if args.saturation_bias:
        size, pairs = args.sizes[0]
        for amp, flush in itertools.product(args.amps, args.flush_denormal):
            rows.append((size, pairs, args.optimizers[0], amp, "channels_last", flush, args.saturation_bias))
    for size, pairs, opt, amp, fmt, flush, bias in rows:
        seconds = time_steps(size, pairs, opt, amp, fmt == "channels_last", flush == "on", bias, args.warmup,
                             args.iterations, args.seed)
        head = f"bias {bias:g}" if bias else "random"
        print(f"{size:>4} {pairs:>5} {opt:>5} {amp:>5} {fmt:>13} {flush:>5} {head:>9} {seconds:7.3f} "
              f"{pairs / seconds:8.1f} {os.getloadavg()[0]:5.2f}", flush=True)


def main() -> None:
    """Print s/it and pairs/s per variant."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=[(64, 32), (32, 64)],
                        help="<image_size>:<pairs per batch>")
    parser.add_argument("--optimizers", nargs="+", default=["lars", "sgd"], choices=["lars", "sgd"])
    parser.add_argument("--amps", nargs="+", default=["none", "bf16"], choices=["none", "bf16"])
    parser.add_argument("--formats", nargs="+", default=["channels_last", "nchw"], choices=["channels_last", "nchw"])
    parser.add_argument("--flush_denormal", nargs="+", default=["on", "off"], choices=["on", "off"])
    parser.add_argument("--saturation_bias", type=float, default=-9.0,
                        help="head bias of the 'saturated head' rows (0 = skip them)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations per variant")
    parser.add_argument("--iterations", type=int, default=6, help="timed iterations per variant (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--train_py", type=int, default=0, help="also run train.py for this many iterations")
    parser.add_argument("--num_workers", type=int, nargs="+", default=[1], help="DataLoader workers of train.py")
    parser.add_argument("--no_steps", action="store_true", help="skip the step table (only the train.py runs)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, ResNet-18 + relational depth 4, "
          f"L2 objective; median of {args.iterations} iterations after {args.warmup} warm-up; 'load' = 1-min "
          f"load average after the row (this process counts ~{args.threads}: more means contention)")
    if not args.no_steps:
        step_table(args)
    if args.train_py:
        with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
            work = Path(tmp)
            write_textured_tree(work / "train", {f"class_{c:02d}": 20 for c in range(10)}, 256, args.seed)
            print(f"\n## train.py --dataset Folder, 10 classes x 20 JPEGs 256 px, {2 * max(1, args.train_py // 2)} "
                  f"iterations, flush_denormal on (train.py's CPU default), lars, OMP threads {args.threads}")
            print(f"{'px':>4} {'pairs':>5} {'amp':>5} {'workers':>7} {'wall s':>7} {'s/it (2nd half)':>15} "
                  f"{'pairs/s':>8}")
            for (size, pairs), amp, workers in itertools.product(args.sizes, args.amps, args.num_workers):
                wall, per_it = train_py_run(work, size, pairs, amp, args.train_py, workers, args.threads)
                print(f"{size:>4} {pairs:>5} {amp:>5} {workers:>7} {wall:7.1f} {per_it:15.3f} {pairs / per_it:8.1f}",
                      flush=True)


if __name__ == "__main__":
    main()
