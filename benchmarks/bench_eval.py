"""CPU speed of the prototype evaluation (backbone, DataLoader, relational scoring) vs the authors' loop.

    python benchmarks/bench_eval.py                      # generated 6- and 54-class Folder trees
    python benchmarks/bench_eval.py --num_workers 0 --classes 6
    # fp32 / bf16 agreement on a trained model and a real split:
    python train.py --demo --data_root R --checkpoint_folder_path OUT
    python benchmarks/bench_eval.py --checkpoint OUT/<run> --dataset Digits \
        --target seen --data_root R --agreement_image_size 32 --skip backbone pipeline

Sections:
  (a) `ResNetBackbone` forward alone on preprocessed batches: fp32 NCHW, channels_last, BatchNorm
      folded (what evaluate_splits runs), bf16.
  (b) the full `evaluate_splits` on a generated `Folder` tree (JPEGs, 256 px, textured) at each
      number of known classes (prototypes), with the DataLoader timed alone next to it.
  (c) the authors' evaluation structure re-created here (batch-1 backbone calls, fp32 NCHW; per
      scored image one relational call per prototype, and again with its prototypes in one call),
      timed on a subset and extrapolated to the split.
  (d) fp32 vs bf16 agreement: |AUROC difference| and the largest relative feature difference, on
      --dataset (a real split such as Digits and a trained --checkpoint make this meaningful).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

# Runnable as `python benchmarks/bench_eval.py` from anywhere: the project packages live at the repo root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.benchmarks import EvalSplit, get_eval_split  # noqa: E402
from datasets.image_lists import ImageListDataset, Sample  # noqa: E402
from datasets.transforms import eval_transform  # noqa: E402
from evaluation.evaluate import EvalResult, EvalSettings, evaluate_splits  # noqa: E402
from evaluation.features import extract_image_features  # noqa: E402
from models.backbone import ResNetBackbone, fold_batchnorm  # noqa: E402
from models.checkpoint import LoadedModel, load_model_folder, save_model_folder  # noqa: E402
from models.relational import RelationalTransformer  # noqa: E402
from utils.precision import autocast  # noqa: E402

# Known classes -> support images per class (PACS-like 6 classes, OfficeHome-like 54 classes).
SUPPORT_PER_CLASS = {6: 10, 54: 3}
# Reference figures measured earlier on this machine (issue), ms per image.
AUTHORS_REFERENCE_MS = 44.0
TARGET_FP32_SPEEDUP = 1.5
TARGET_BF16_SPEEDUP = 5.0
TARGET_AUROC_GAP = 0.005
CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# Generated data.

def textured_image(rng: np.random.Generator, size: int, tint: np.ndarray) -> Image.Image:
    """Smooth random colour blobs plus finer texture and grain, so JPEG decoding costs what a photo does."""
    def upsampled(cells: int, amplitude: float) -> np.ndarray:
        field = rng.uniform(-amplitude, amplitude, size=(cells, cells, 3)).astype(np.float32)
        channels = [np.asarray(Image.fromarray(field[:, :, c], mode="F").resize((size, size), Image.BICUBIC))
                    for c in range(3)]
        return np.stack(channels, axis=2)

    pixels = tint + upsampled(5, 70.0) + upsampled(24, 35.0) + rng.normal(0.0, 6.0, size=(size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_textured_tree(root: Path, counts: Dict[str, int], size: int, seed: int) -> None:
    """`counts[class_name]` JPEGs (quality 90) in `root/<class_name>/`, one tint per class."""
    rng = np.random.default_rng(seed)
    for name, count in sorted(counts.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        tint = rng.uniform(60, 200, size=3)
        for i in range(count):
            textured_image(rng, size, tint).save(folder / f"{name}_{i:04d}.jpg", quality=90)


def make_folder_split(root: Path, known: int, support_per_class: int, n_scored: int,
                      unknown_classes: int, size: int, seed: int) -> EvalSplit:
    """A generated Folder benchmark: `known` support classes; `n_scored` targets over known + unknown classes."""
    known_names = [f"known_{c:02d}" for c in range(known)]
    target_names = known_names + [f"novel_{c:02d}" for c in range(unknown_classes)]
    scored = {name: 0 for name in target_names}
    for i in range(n_scored):
        scored[target_names[i % len(target_names)]] += 1
    write_textured_tree(root / "source", {name: support_per_class for name in known_names}, size, seed)
    write_textured_tree(root / "target", {k: v for k, v in scored.items() if v}, size, seed + 1)
    return get_eval_split("Folder", f"gen{known}", None, source_dir=str(root / "source"),
                          target_dir=str(root / "target"))


def random_checkpoint(folder: Path, depth: int, seed: int) -> None:
    """Random-init ResNet-18 + relational transformer written in the authors' checkpoint format."""
    torch.manual_seed(seed)
    backbone = ResNetBackbone("resnet18", weights=None)
    relational = RelationalTransformer(feat_dim=backbone.feat_dim, depth=depth)
    save_model_folder(str(folder), backbone, relational, iteration=None)


# ---------------------------------------------------------------------------------------------
# Timing helpers.

def load_average() -> str:
    """The 1-, 5- and 15-minute load averages (CPU contention makes every figure here slower)."""
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def best_of(fn: Callable[[], object], repeats: int) -> Tuple[float, object]:
    """(smallest wall seconds over `repeats` calls, the last call's return value)."""
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return min(times), value


@torch.inference_mode()
def time_backbone(backbone: torch.nn.Module, batch: torch.Tensor, amp: str, repeats: int) -> float:
    """Best seconds of one backbone forward on `batch` (after one warm-up call)."""
    def run() -> None:
        with autocast(CPU, amp):
            backbone(batch)

    run()
    return best_of(run, repeats)[0]


def backbone_section(model: LoadedModel, args: argparse.Namespace) -> None:
    """(a) images/s of ResNetBackbone.forward on preprocessed batches in each precision and layout."""
    print(f"\n## (a) backbone alone: {model.network} forward on preprocessed {args.image_size} px batches, "
          f"inference_mode")
    print(f"{'variant':<50} {'batch':>5} {'ms/img':>8} {'img/s':>8}")
    backbone = model.backbone.eval()
    size = args.image_size
    gen = torch.Generator().manual_seed(args.seed)
    batch = torch.randn(args.backbone_batch, 3, size, size, generator=gen)
    single = batch[:1].clone()
    cl_batch = batch.contiguous(memory_format=torch.channels_last)
    folded = fold_batchnorm(backbone)
    variants = [
        ("fp32 NCHW, batch 1 (the authors' calls)", backbone, single, "none", args.repeats * 5),
        ("fp32 NCHW", backbone, batch, "none", args.repeats),
        ("fp32 channels_last input", backbone, cl_batch, "none", args.repeats),
        ("fp32 channels_last, BN folded (as evaluate_splits)", folded, cl_batch, "none", args.repeats),
        ("bf16 autocast channels_last input", backbone, cl_batch, "bf16", args.repeats),
        ("bf16 channels_last, BN folded (as evaluate_splits)", folded, cl_batch, "bf16", args.repeats),
    ]
    for name, module, images, amp, repeats in variants:
        seconds = time_backbone(module, images, amp, repeats)
        n = images.shape[0]
        print(f"{name:<50} {n:>5} {1000 * seconds / n:8.2f} {n / seconds:8.1f}", flush=True)


def time_loader(samples: Sequence[Sample], settings: EvalSettings) -> float:
    """Seconds to iterate a DataLoader built as extract_image_features builds it (decode, resize, normalise)."""
    dataset = ImageListDataset(list(samples), eval_transform(settings.image_size))
    loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=False,
                        num_workers=settings.num_workers, persistent_workers=False)
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# The authors' evaluation structure, re-created for comparison.

@torch.no_grad()
def authors_style_eval(model: LoadedModel, support: Sequence[Sample], scored: Sequence[Sample],
                       n_classes: int, image_size: int, num_workers: int,
                       batch_prototypes: bool = False) -> Dict[str, object]:
    """The authors' loop: one image per backbone call, fp32 NCHW, unfolded BatchNorm; per target either
    one relational call per prototype or (`batch_prototypes`) one call holding all its prototypes.

    Scored as the authors do, written here from their formula rather than taken from the project:
    the negated raw head output (L2 head) or the same-class logit (CE head), softmax over classes.
    """
    backbone, relational = model.backbone.eval(), model.relational.eval()
    transform = eval_transform(image_size)

    def loader(samples: Sequence[Sample]) -> DataLoader:
        return DataLoader(ImageListDataset(list(samples), transform), batch_size=1, shuffle=False,
                          num_workers=num_workers)

    start = time.perf_counter()
    sums = torch.zeros(n_classes, backbone.feat_dim)
    counts = torch.zeros(n_classes)
    for image, label, _ in loader(support):
        sums[label] += backbone(image)[0]
        counts[label] += 1
    prototypes = sums / counts.clamp(min=1).unsqueeze(1)
    support_s = time.perf_counter() - start

    start = time.perf_counter()
    normality, preds = [], []
    for image, _, _ in loader(scored):
        feat = backbone(image)
        if batch_prototypes:
            logits = relational(feat.expand(n_classes, -1), prototypes)
        else:
            logits = torch.cat([relational(feat, prototypes[c:c + 1]) for c in range(n_classes)])
        scores = -logits[:, 0] if logits.shape[1] == 1 else logits[:, 0]
        prob = torch.softmax(scores, dim=0)
        normality.append(float(prob.max()))
        preds.append(int(prob.argmax()))
    scored_s = time.perf_counter() - start
    return {"support_s": support_s, "scored_s": scored_s, "normality": np.array(normality),
            "preds": np.array(preds)}


def authors_subset(split: EvalSplit, n_support: int, n_scored: int) -> Tuple[List[Sample], List[Sample]]:
    """Evenly spaced subsets of the support and scored lists (n <= 0 keeps the whole list)."""
    def spaced(samples: List[Sample], n: int) -> List[Sample]:
        if n <= 0 or n >= len(samples):
            return list(samples)
        return [samples[i] for i in np.linspace(0, len(samples) - 1, n).round().astype(int)]
    return spaced(split.support, n_support), spaced(split.scored, n_scored)


# ---------------------------------------------------------------------------------------------
# Sections (b) and (c).

def run_eval(model: LoadedModel, split: EvalSplit, settings: EvalSettings) -> Tuple[float, EvalResult]:
    """(wall seconds, ReSeND result) of one evaluate_splits call with the default `resend` scorer."""
    start = time.perf_counter()
    (result,) = evaluate_splits([split], model.backbone, model.relational, settings, CPU)
    return time.perf_counter() - start, result


def pipeline_section(model: LoadedModel, split: EvalSplit, args: argparse.Namespace) -> Dict[str, object]:
    """(b) + (c) for one split: print the table rows and return the figures for the summary."""
    n_support, n_scored = len(split.support), len(split.scored)
    n_images = n_support + n_scored
    print(f"\n## {split.known_classes} known classes (prototypes): support {n_support}, scored {n_scored} "
          f"({sum(label >= split.known_classes for _, label in split.scored)} unknown), "
          f"{args.image_size} px, batch {args.batch_size}, num_workers {args.num_workers}")
    figures: Dict[str, object] = {"classes": split.known_classes, "images": n_images}
    base = EvalSettings(image_size=args.image_size, batch_size=args.batch_size, num_workers=args.num_workers)

    loader_s = min(time_loader(split.support + split.scored, base) for _ in range(args.repeats))
    print(f"(b) DataLoader alone (decode + resize + normalise, {args.num_workers} workers): "
          f"{loader_s:.2f} s = {1000 * loader_s / n_images:.2f} ms/img, {n_images / loader_s:.1f} img/s")
    figures["loader_ms"] = 1000 * loader_s / n_images

    print(f"{'(b) evaluate_splits':<22} {'wall s':>7} {'ms/img':>7} {'img/s':>7} {'features s':>10} "
          f"{'scoring s':>9} {'scoring %':>9} {'auroc':>7}")
    results = {}
    for amp in args.amps:
        settings = EvalSettings(image_size=args.image_size, batch_size=args.batch_size,
                                num_workers=args.num_workers, amp=amp)
        run_eval(model, split, settings)  # warm-up: oneDNN primitives, worker start-up paths
        runs = [run_eval(model, split, settings) for _ in range(args.repeats)]
        wall, result = min(runs, key=lambda run: run[0])
        sec = result.seconds
        print(f"{'amp ' + amp:<22} {wall:7.2f} {1000 * wall / n_images:7.2f} {n_images / wall:7.1f} "
              f"{sec['features']:10.2f} {sec['scoring']:9.2f} "
              f"{100 * sec['scoring'] / wall:8.1f}% {result.metrics['auroc']:7.4f}", flush=True)
        results[amp] = (wall, result)
        figures[f"wall_{amp}"] = wall
        feature_ms = 1000 * sec["features"] / n_images
        bound = "data loading is the bottleneck" if loader_s * 1000 / n_images >= 0.8 * feature_ms else \
            "compute-bound (the loader keeps up)"
        print(f"{'':<22} features {feature_ms:.2f} ms/img vs DataLoader alone "
              f"{1000 * loader_s / n_images:.2f} ms/img: {bound}")

    if "authors" in args.skip:
        return figures
    sub_support, sub_scored = authors_subset(split, args.authors_support, args.authors_scored)
    authors_style_eval(model, sub_support[:2], sub_scored[:2], split.known_classes, args.image_size,
                       args.num_workers)  # warm-up
    for batch_prototypes in (False, True):
        loop = authors_style_eval(model, sub_support, sub_scored, split.known_classes, args.image_size,
                                  args.num_workers, batch_prototypes)
        ms_support = 1000 * loop["support_s"] / len(sub_support)
        ms_scored = 1000 * loop["scored_s"] / len(sub_scored)
        loop_total = (n_support * ms_support + n_scored * ms_scored) / 1000
        calls = "1 relational call with all prototypes" if batch_prototypes else \
            f"{split.known_classes} relational calls"
        print(f"(c) authors' loop on {len(sub_support)} support + {len(sub_scored)} scored images, {calls} per "
              f"scored image: {ms_support:.1f} ms/support img, {ms_scored:.1f} ms/scored img -> "
              f"{loop_total:.2f} s for the split = {1000 * loop_total / n_images:.1f} ms/img")
        if batch_prototypes:
            # The cheaper of the two readings of the authors' loop is the fair reference.
            figures["authors_batched_s"] = loop_total
        else:
            authors, authors_total = loop, loop_total
    figures["authors_s"] = authors_total
    figures["authors_ms_scored"] = 1000 * authors["scored_s"] / len(sub_scored)
    for amp, (wall, _) in results.items():
        figures[f"speedup_{amp}"] = authors_total / wall
        figures[f"speedup_batched_{amp}"] = figures["authors_batched_s"] / wall
        print(f"    speed-up of evaluate_splits amp {amp}: {authors_total / wall:.2f}x over the per-prototype loop, "
              f"{figures['authors_batched_s'] / wall:.2f}x over the batched-prototype loop, "
              f"{AUTHORS_REFERENCE_MS * n_images / 1000 / wall:.2f}x over the issue's "
              f"{AUTHORS_REFERENCE_MS:.0f} ms/img reference")

    if "none" in results:
        _, ours = results["none"]
        # Same checkpoint, same images: the subset's normality must match ours up to float rounding.
        position = {path: i for i, path in enumerate(ours.paths)}
        rows = [position[path] for path, _ in sub_scored]
        gap = float(np.abs(ours.normality[rows] - authors["normality"]).max())
        same_pred = float(np.mean(ours.preds[rows] == authors["preds"]))
        print(f"    check vs authors' loop (fp32): max |normality diff| {gap:.2e}, same prediction {same_pred:.0%}")
        figures["authors_gap"] = gap
    if "none" in results and "bf16" in results:
        fp32, bf16 = results["none"][1], results["bf16"][1]
        figures["auroc_gap"] = abs(fp32.metrics["auroc"] - bf16.metrics["auroc"])
        print(f"    fp32 vs bf16: |AUROC diff| {figures['auroc_gap']:.4f}, max |normality diff| "
              f"{np.abs(fp32.normality - bf16.normality).max():.2e} (random weights: scores are nearly flat)")
    return figures


# ---------------------------------------------------------------------------------------------
# Section (d).

def agreement_section(model: LoadedModel, split: EvalSplit, args: argparse.Namespace) -> Optional[float]:
    """(d) fp32 vs bf16: AUROC of the whole split and the relative feature difference per image."""
    size = args.agreement_image_size or args.image_size
    print(f"\n## (d) fp32 vs bf16 agreement on {split.dataset}/{split.target}: support {len(split.support)}, "
          f"scored {len(split.scored)}, {size} px, checkpoint "
          f"{args.checkpoint or 'random weights (not meaningful)'}")
    results = {}
    for amp in ("none", "bf16"):
        settings = EvalSettings(image_size=size, batch_size=args.batch_size, num_workers=args.num_workers,
                                amp=amp)
        wall, results[amp] = run_eval(model, split, settings)
        print(f"amp {amp:<5} auroc {results[amp].metrics['auroc']:.4f}  fpr95 {results[amp].metrics['fpr95']:.4f}"
              f"  closed-set acc {results[amp].metrics['closed_set_acc']:.4f}  ({wall:.1f} s)", flush=True)
    gap = abs(results["none"].metrics["auroc"] - results["bf16"].metrics["auroc"])
    normality_gap = np.abs(results["none"].normality - results["bf16"].normality).max()
    same_pred = np.mean(results["none"].preds == results["bf16"].preds)
    print(f"|AUROC_fp32 - AUROC_bf16| = {gap:.4f} (target <= {TARGET_AUROC_GAP}: "
          f"{'met' if gap <= TARGET_AUROC_GAP else 'MISSED'}); max |normality diff| {normality_gap:.3e}; "
          f"same prediction {same_pred:.1%}")
    # A near-flat score (an untrained or weak model) turns tiny bf16 perturbations into rank swaps.
    spread = results["none"].normality.std()
    print(f"fp32 normality: std {spread:.3e}, range {np.ptp(results['none'].normality):.3e} "
          f"(max |diff| / std = {normality_gap / max(spread, 1e-30):.2f})")

    samples = (split.support + split.scored)[: args.agreement_feature_images]
    parts = [([path for path, _ in samples], eval_transform(size))]
    feats = {amp: extract_image_features(model.backbone, parts, args.batch_size, args.num_workers, CPU, amp)[0].feats
             for amp in ("none", "bf16")}
    relative = torch.linalg.vector_norm(feats["bf16"] - feats["none"], dim=1) / torch.linalg.vector_norm(
        feats["none"], dim=1).clamp(min=1e-12)
    print(f"backbone features of {len(samples)} images: relative L2 difference per image "
          f"||f_bf16 - f_fp32|| / ||f_fp32||: max {relative.max():.4f}, mean {relative.mean():.4f}")
    return gap


# ---------------------------------------------------------------------------------------------

def profile_eval(model: LoadedModel, split: EvalSplit, args: argparse.Namespace, amp: str) -> None:
    """torch.profiler over one evaluate_splits call: the top operators by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    settings = EvalSettings(image_size=args.image_size, batch_size=args.batch_size,
                            num_workers=args.num_workers, amp=amp)
    run_eval(model, split, settings)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_eval(model, split, settings)
    print(f"\n## profile of evaluate_splits ({split.known_classes} classes, amp {amp}): top operators")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))


def summary(all_figures: List[Dict[str, object]], gap: Optional[float]) -> None:
    """The targets, met or missed, against the re-created loops and against the issue's reference figure."""
    print("\n## summary: speed-up = authors' time / evaluate_splits wall time over the same support + scored "
          "images; 'loop' = the per-prototype loop of (c), 'batched' = the batched-prototype loop of (c), "
          f"'{AUTHORS_REFERENCE_MS:.0f}' = the issue's {AUTHORS_REFERENCE_MS:.0f} ms/img (a PACS figure: 6 "
          "prototypes, 224 px)")
    print(f"{'classes':>7} {'loop':>7} {'batched':>7} {'fp32':>7} {'bf16':>7} {'fp32 x':>26} {'bf16 x':>26} "
          f"{'loader':>7}")
    print(f"{'':>7} {'ms/img':>7} {'ms/img':>7} {'ms/img':>7} {'ms/img':>7} {'loop / batched / 44':>26} "
          f"{'loop / batched / 44':>26} {'ms/img':>7}")
    nan = float("nan")
    for fig in all_figures:
        per_image = lambda seconds: 1000 * seconds / fig["images"]  # noqa: E731
        ratios = {}
        for amp in ("none", "bf16"):
            fig[f"reference_{amp}"] = AUTHORS_REFERENCE_MS / per_image(fig.get(f"wall_{amp}", nan))
            ratios[amp] = " / ".join(f"{fig.get(key, nan):6.2f}" for key in (
                f"speedup_{amp}", f"speedup_batched_{amp}", f"reference_{amp}"))
        print(f"{fig['classes']:>7} {per_image(fig['authors_s']):7.1f} {per_image(fig['authors_batched_s']):7.1f} "
              f"{per_image(fig.get('wall_none', nan)):7.1f} {per_image(fig.get('wall_bf16', nan)):7.1f} "
              f"{ratios['none']:>26} {ratios['bf16']:>26} {fig['loader_ms']:7.2f}")
    for fig in all_figures:
        for amp, target in (("none", TARGET_FP32_SPEEDUP), ("bf16", TARGET_BF16_SPEEDUP)):
            if f"speedup_{amp}" not in fig:
                continue
            verdicts = ", ".join(
                f"vs {name} {'met' if fig[key] >= target else 'MISSED'} ({fig[key]:.2f}x)"
                for name, key in (("loop", f"speedup_{amp}"), ("batched loop", f"speedup_batched_{amp}"),
                                  (f"{AUTHORS_REFERENCE_MS:.0f} ms/img", f"reference_{amp}")))
            print(f"target amp {amp} >= {target}x at {fig['classes']} classes: {verdicts}")
    if gap is not None:
        verdict = "met" if gap <= TARGET_AUROC_GAP else "MISSED"
        print(f"target |AUROC_fp32 - AUROC_bf16| <= {TARGET_AUROC_GAP}: {verdict} ({gap:.4f})")


def parse_args() -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="checkpoint folder (default: random weights)")
    parser.add_argument("--depth", type=int, default=4, help="relational depth of the random checkpoint")
    parser.add_argument("--classes", type=int, nargs="+", default=sorted(SUPPORT_PER_CLASS),
                        help="known classes of each generated Folder split")
    parser.add_argument("--support_per_class", type=int, default=None,
                        help="support images per class (default 10 at <= 6 classes, else 3)")
    parser.add_argument("--scored", type=int, default=200, help="scored images per generated split")
    parser.add_argument("--unknown_classes", type=int, default=None,
                        help="novel target classes (default: 1 at <= 6 known classes, else 6)")
    parser.add_argument("--gen_size", type=int, default=256, help="side of the generated JPEGs")
    parser.add_argument("--data_dir", default=None, help="where to write the generated trees (default: temp)")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=64, help="EvalSettings.batch_size")
    parser.add_argument("--num_workers", type=int, default=0,
                        help="EvalSettings.num_workers (train.py's default on a CPU is 0)")
    parser.add_argument("--amps", nargs="+", default=["none", "bf16"], choices=["none", "bf16"])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats (best is reported)")
    parser.add_argument("--backbone_batch", type=int, default=64, help="batch of section (a)")
    parser.add_argument("--authors_support", type=int, default=0,
                        help="support images of the authors' loop (0 = all, so its scores can be checked against ours)")
    parser.add_argument("--authors_scored", type=int, default=40, help="scored images of the authors' loop")
    parser.add_argument("--skip", nargs="*", default=[], choices=["backbone", "pipeline", "authors", "agreement"])
    parser.add_argument("--dataset", default="Folder",
                        help="(d) split: Folder = the first generated tree, or e.g. Digits with --data_root")
    parser.add_argument("--target", default=None, help="(d) target of --dataset")
    parser.add_argument("--data_root", default=None, help="(d) data root of --dataset")
    parser.add_argument("--agreement_image_size", type=int, default=None, help="(d) image size (default --image_size)")
    parser.add_argument("--agreement_feature_images", type=int, default=256,
                        help="(d) images whose features are compared")
    parser.add_argument("--profile", nargs="*", default=None, choices=["none", "bf16"],
                        help="print torch.profiler top operators of evaluate_splits for these amp modes")
    parser.add_argument("--profile_rows", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    """Generate data and a checkpoint if needed, then run the requested sections."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        work = Path(args.data_dir) if args.data_dir else Path(tmp)
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = str(work / "random_checkpoint")
            random_checkpoint(Path(checkpoint), args.depth, args.seed)
        model = load_model_folder(checkpoint)
        print(f"load average at start {load_average()}")
        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, checkpoint "
              f"{args.checkpoint or f'random init (resnet18 + relational depth {args.depth})'}, "
              f"objective {model.objective}")
        start = time.perf_counter()
        splits = []
        for known in args.classes:
            per_class = args.support_per_class or (10 if known <= 6 else 3)
            unknown = args.unknown_classes or (1 if known <= 6 else 6)
            splits.append(make_folder_split(work / f"folder_{known}", known, per_class, args.scored, unknown,
                                            args.gen_size, args.seed + known))
        jpeg_bytes = [Path(p).stat().st_size for s in splits for p, _ in s.support + s.scored]
        print(f"generated {len(jpeg_bytes)} JPEGs {args.gen_size}x{args.gen_size} in "
              f"{time.perf_counter() - start:.1f} s (mean {statistics.mean(jpeg_bytes) / 1024:.1f} KiB) under {work}")

        if "backbone" not in args.skip:
            backbone_section(model, args)
        figures = []
        if "pipeline" not in args.skip:
            figures = [pipeline_section(model, split, args) for split in splits]
        if args.profile:
            for amp in args.profile:
                for split in splits:
                    profile_eval(model, split, args, amp)
        gap = None
        if "agreement" not in args.skip:
            if args.dataset == "Folder":
                split = splits[0]
            else:
                split = get_eval_split(args.dataset, args.target, args.data_root)
            gap = agreement_section(model, split, args)
        if any("authors_s" in fig for fig in figures):
            summary([fig for fig in figures if "authors_s" in fig], gap if args.checkpoint else None)
        print(f"load average at end {load_average()} (includes this benchmark's own threads and workers)")


if __name__ == "__main__":
    main()
