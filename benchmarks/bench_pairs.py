"""Time and memory of one class-balanced `make_pairs` pass on ImageNet-1k-like labels, and of a process's
pass start: from "new pass" (the draw) to its first batch of pair indices (training.pair_stream)."""
import argparse
import multiprocessing
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
from torch.utils.data.distributed import DistributedSampler

# Runnable as `python benchmarks/bench_pairs.py` from anywhere: the project packages live at the repo root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.pairs import make_pairs, pass_rng  # noqa: E402
from training.pair_stream import ShardBatches  # noqa: E402

TIME_TARGET_S = 5.0
MEMORY_TARGET_BYTES = 0.5 * 2 ** 30


def imagenet_like_class_sizes(n_images: int, n_classes: int, min_size: int, max_size: int,
                              rng: np.random.Generator) -> np.ndarray:
    """Class sizes in [min_size, max_size] summing to n_images: most classes full, as in ImageNet-1k."""
    if not n_classes * min_size <= n_images <= n_classes * max_size:
        raise ValueError(f"--n {n_images} cannot be split into {n_classes} classes of "
                         f"{min_size}..{max_size} images")
    sizes = np.full(n_classes, max_size, dtype=np.int64)
    deficit = n_classes * max_size - n_images
    for position, c in enumerate(rng.permutation(n_classes)):
        if deficit == 0:
            break
        # The first shortened class takes the whole allowed cut so the smallest class is min_size
        # (ImageNet's smallest has 732 images), as long as the deficit allows it.
        cut = max_size - min_size if position == 0 else int(rng.integers(1, max_size - min_size + 1))
        cut = min(cut, deficit)
        sizes[c] -= cut
        deficit -= cut
    return sizes


def max_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    """Build the labels, run one timed pass and one traced pass, print the figures against the targets."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1281167, help="number of images")
    parser.add_argument("--classes", type=int, default=1000, help="number of classes")
    parser.add_argument("--ratio", type=int, default=20, help="negative-to-positive ratio R")
    parser.add_argument("--min-size", type=int, default=732, help="smallest class size")
    parser.add_argument("--max-size", type=int, default=1300, help="largest class size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--world_size", type=int, default=16, help="processes the pass is sharded over")
    parser.add_argument("--batch_size", type=int, default=256, help="pairs per process per micro-step")
    parser.add_argument("--with_list_sampler", action="store_true",
                        help="also time the earlier pass start that built the shard as a Python list")
    args = parser.parse_args()

    label_rng = np.random.default_rng(args.seed)
    sizes = imagenet_like_class_sizes(args.n, args.classes, args.min_size, args.max_size, label_rng)
    labels = label_rng.permutation(np.repeat(np.arange(args.classes), sizes))
    print(f"labels: {len(labels)} images, {args.classes} classes, sizes {sizes.min()}..{sizes.max()}, "
          f"R = {args.ratio}, class balancing on")

    # Timed pass without tracemalloc (it slows allocation); ru_maxrss is a high-water mark, so this
    # pass must come before the traced one to measure its own increase.
    rss_before = max_rss_bytes()
    start = time.perf_counter()
    pairs = make_pairs(labels, args.ratio, True, pass_rng(args.seed, 0))
    elapsed = time.perf_counter() - start
    rss_increase = max_rss_bytes() - rss_before
    n_pairs = len(pairs[0])
    output_bytes = sum(a.nbytes for a in pairs)
    expected = (1 + args.ratio) * args.classes * int(sizes.max())
    del pairs

    tracemalloc.start()
    pairs = make_pairs(labels, args.ratio, True, pass_rng(args.seed, 0))
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del pairs

    gib = 2 ** 30
    print(f"pairs: {n_pairs} (expected (1+R) x C x max_size = {expected})")
    print(f"wall time: {elapsed:.2f} s (target < {TIME_TARGET_S:.0f} s): "
          f"{'met' if elapsed < TIME_TARGET_S else 'NOT met'}")
    print(f"output arrays: {output_bytes / gib:.3f} GiB")
    print(f"tracemalloc peak: {traced_peak / gib:.3f} GiB (target < 0.5 GiB): "
          f"{'met' if traced_peak < MEMORY_TARGET_BYTES else 'NOT met'}")
    print(f"ru_maxrss increase: {rss_increase / gib:.3f} GiB (target < 0.5 GiB): "
          f"{'met' if rss_increase < MEMORY_TARGET_BYTES else 'NOT met'}")

    # One process's pass start, in a fresh child so that its peak memory is its own.
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        seconds, first_batch, rss = pool.apply(pass_start, (labels, args.ratio, args.seed, args.world_size,
                                                            args.batch_size))
    print(f"pass start of one of {args.world_size} processes (draw + shard + first batch of {args.batch_size} "
          f"indices): {seconds:.2f} s (target < {TIME_TARGET_S:.0f} s): "
          f"{'met' if seconds < TIME_TARGET_S else 'NOT met'}; first batch starts {first_batch[:3]}")
    print(f"its resident peak increase: {rss / gib:.3f} GiB (target < 0.5 GiB): "
          f"{'met' if rss < MEMORY_TARGET_BYTES else 'NOT met'}")
    if args.with_list_sampler:
        with context.Pool(1) as pool:
            seconds, _, rss = pool.apply(pass_start, (labels, args.ratio, args.seed, args.world_size,
                                                      args.batch_size, True))
        print(f"the same with the earlier list-building DistributedSampler: {seconds:.2f} s, "
              f"resident peak increase {rss / gib:.3f} GiB")


def _status_kib(field: str) -> int:
    """A memory field (VmRSS, VmHWM) of /proc/self/status, in KiB."""
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def pass_start(labels: np.ndarray, ratio: int, seed: int, world_size: int, batch_size: int,
               list_sampler: bool = False) -> tuple[float, list, int]:
    """(seconds, first batch, peak memory increase) from a new pass to rank 0's first batch of indices.

    The peak is the resident high-water mark, reset first (Linux /proc/self/clear_refs) so that the
    child's start-up (importing torch) cannot hide it, minus the resident size before the pass.
    """
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
        clear.write("5")  # resets VmHWM to the current resident size
    rss_before = _status_kib("VmRSS")
    start = time.perf_counter()
    anchors, _, _ = make_pairs(labels, ratio, True, pass_rng(seed, 0))
    if list_sampler:
        # What the pipeline did before ShardBatches: the sampler's whole shard as a Python list.
        sampler = DistributedSampler(range(len(anchors)), num_replicas=world_size, rank=0, shuffle=True, seed=seed,
                                     drop_last=True)
        first = list(iter(sampler))[:batch_size]
    else:
        first = next(iter(ShardBatches(len(anchors), world_size, 0, seed, 0, batch_size)))
    seconds = time.perf_counter() - start
    return seconds, first, (_status_kib("VmHWM") - rss_before) * 1024


if __name__ == "__main__":
    main()
