"""Fit + score seconds of every baseline scorer (and ReSeND's relational scorer) on PACS/OfficeHome-sized features.

The features are synthetic (timing only: their AUROC column is a sanity check, not a result). The
relational row is by far the slowest on CPU (every target x prototype pair runs the transformer:
about 11 minutes for the OfficeHome size on 2 cores); `--no-resend` skips it.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

# Runnable as `python benchmarks/bench_scorers.py` from anywhere: the project packages live at the repo root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.evaluate import default_pair_chunk, relational_pair_logits  # noqa: E402
from evaluation.metrics import auroc  # noqa: E402
from evaluation.scorers import SCORERS, FeatureBatch, ScoringInputs, build_scorer, fit_scorer  # noqa: E402
from models.relational import RelationalTransformer  # noqa: E402

# Every registered scorer without the relational module, then ReSeND's default one.
DEFAULT_SCORERS = [name for name, cls in SCORERS.items() if not cls.needs_pair_logits] + ["resend"]
# (support size, known classes, targets): the largest PACS / OfficeHome splits, rounded; pacs_art: PACS with
# ArtPainting as the target (3124 support images of 6 known classes, 2048 scored), the size the time
# budget of the scorers is stated at.
SIZES = {"pacs": (5000, 6, 2000), "pacs_art": (3124, 6, 2048), "officehome": (10000, 54, 4000),
         "tiny": (60, 3, 40)}  # tiny: smoke test
N_BLOCKS = 8  # resnet18
MAP_SIDE = 7  # the last feature map of a ResNet at 224 px: 7 x 7


def synthetic_split(n_support: int, n_classes: int, n_targets: int, dim: int, seed: int,
                    feature_maps: bool = False) -> dict:
    """Post-ReLU-like class-structured features; one target in four comes from an unseen class.

    With `feature_maps`, the targets also get [n_targets, dim, 7, 7] maps whose spatial mean is the feature
    (float16, as the engine keeps them)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes + 1, dim, generator=g)

    def draw(labels: torch.Tensor) -> torch.Tensor:
        return torch.relu(centres[labels] + 0.8 * torch.randn(len(labels), dim, generator=g))

    support_labels = torch.randint(0, n_classes, (n_support,), generator=g)
    support_labels[:n_classes] = torch.arange(n_classes)  # every class present
    target_labels = torch.randint(0, n_classes, (n_targets,), generator=g)
    target_labels[: n_targets // 4] = n_classes
    is_known = (target_labels < n_classes).numpy()

    def norms(rows: int, boost: torch.Tensor | None) -> torch.Tensor:
        values = 1.0 + 0.2 * torch.rand(rows, N_BLOCKS, generator=g)
        if boost is not None:
            values[:, 5] += boost
        return values

    targets = draw(target_labels)
    maps = None
    if feature_maps:
        wobble = 0.5 * torch.randn(n_targets, dim, MAP_SIDE, MAP_SIDE, generator=g)
        maps = torch.relu(targets[:, :, None, None] + wobble - wobble.mean(dim=(2, 3), keepdim=True)).half()
    return {
        "support": draw(support_labels), "support_labels": support_labels,
        "targets": targets, "is_known": is_known, "target_maps": maps,
        "support_norms": norms(n_support, torch.full((n_support,), 0.5)),
        "jigsaw_norms": norms(n_support, None),
        "target_norms": norms(n_targets, 0.5 * torch.from_numpy(is_known).float()),
    }


def time_scorer(name: str, split: dict, options: dict, pair_logits, pair_chunk: int,
                device: torch.device) -> tuple[float, float, float]:
    """(fit seconds, score seconds, AUROC) of one scorer on one split, given the engine's bundle on `device`."""
    on = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in split.items()}
    scorer = build_scorer(name, options)
    inputs = ScoringInputs(support=FeatureBatch(on["support"], on["support_labels"], on["support_norms"]),
                           jigsaw=FeatureBatch(on["support"], block_norms=on["jigsaw_norms"]),
                           pair_logits=pair_logits, pair_chunk=pair_chunk)
    synchronize(device)
    start = time.perf_counter()
    fit_scorer(scorer, inputs)  # as the engine fits it: with the scorer's fit_threads
    synchronize(device)
    fitted = time.perf_counter()
    result = scorer.score(FeatureBatch(on["targets"], block_norms=on["target_norms"],
                                       feature_maps=on["target_maps"] if scorer.needs_feature_maps else None))
    synchronize(device)
    done = time.perf_counter()
    return fitted - start, done - fitted, auroc(result.normality.cpu().numpy(), split["is_known"])


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so that wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    """Print one line per (size, scorer)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", nargs="+", default=["pacs", "officehome"], choices=list(SIZES))
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--nnk", type=int, default=1, help="--NNK of the scorers that read it")
    parser.add_argument("--scorers", nargs="+", default=DEFAULT_SCORERS, choices=list(SCORERS),
                        help="registered scorers to time (default: every post-hoc one and resend)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--baseline_protocol", default="this", choices=["this", "oodbench"],
                        help="--baseline_protocol of the scorers that read it")
    parser.add_argument("--no-resend", action="store_true", help="skip the relational ReSeND scorers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the features live and the scorers run")
    parser.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"],
                        help="precision of the relational scorers' pair logits")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    relational = RelationalTransformer(feat_dim=args.dim, depth=4).to(device)
    pair_logits = relational_pair_logits(relational, device, args.amp)
    names = [name for name in args.scorers if not (args.no_resend and SCORERS[name].needs_pair_logits)]

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch threads {torch.get_num_threads()}, feature dim {args.dim}, {where}, relational amp {args.amp}")
    print(f"{'size':<11} {'scorer':<19} {'fit s':>8} {'score s':>8} {'total s':>8} {'auroc':>7}")
    options = {"NNK": args.nnk, "baseline_protocol": args.baseline_protocol}
    for size in args.sizes:
        n_support, n_classes, n_targets = SIZES[size]
        split = synthetic_split(n_support, n_classes, n_targets, args.dim, args.seed,
                                feature_maps=any(SCORERS[name].needs_feature_maps for name in names))
        print(f"# {size}: support {n_support} x {args.dim}, {n_classes} classes, targets {n_targets}")
        for name in names:
            fit_s, score_s, auc = time_scorer(name, split, options, pair_logits,
                                              default_pair_chunk(device), device)
            print(f"{size:<11} {name:<19} {fit_s:8.3f} {score_s:8.3f} {fit_s + score_s:8.3f} {auc:7.3f}",
                  flush=True)


if __name__ == "__main__":
    main()
