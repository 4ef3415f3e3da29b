"""Draw the ReSeND architecture (training on pairs, prototype scoring at test time) as a PNG.

Usage: python media/make_architecture_figure.py [--out media/architecture.png]
"""
import argparse
import os
import sys
from pathlib import Path

# Run as a plain script from anywhere: the repository root holds the project packages.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

from models.backbone import NETWORKS  # noqa: E402
from utils.atomic_files import atomic_open  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "architecture.png"

# One colour per kind of stage, shared by both panels so the same module reads the same.
COLOURS = {
    "image": "#f2f2f2",
    "backbone": "#cfe2f3",
    "feature": "#fff2cc",
    "proj": "#d9ead3",
    "token": "#fce5cd",
    "transformer": "#d9d2e9",
    "output": "#f4cccc",
    "score": "#d0e0e3",
}

FEAT_DIM = NETWORKS["resnet18"]
EMBED_DIM = 768


def box(axes, x: float, y: float, w: float, h: float, text: str, kind: str,
        fontsize: float = 10, style: str = "round,pad=0.02,rounding_size=0.8",
        linestyle: str = "-") -> tuple[float, float, float, float]:
    """A rounded box centred on (x, y) with centred text; returns (left, right, bottom, top)."""
    patch = FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle=style, linewidth=1.2,
                           edgecolor="#444444", facecolor=COLOURS[kind], linestyle=linestyle)
    axes.add_patch(patch)
    axes.text(x, y, text, ha="center", va="center", fontsize=fontsize, linespacing=1.3)
    return x - w / 2, x + w / 2, y - h / 2, y + h / 2


def arrow(axes, start: tuple[float, float], end: tuple[float, float], text: str = "",
          text_offset: tuple[float, float] = (0.0, 1.2), style: str = "-|>",
          connection: str = "arc3", colour: str = "#333333", linestyle: str = "-") -> None:
    """An arrow from start to end, optionally labelled near its middle."""
    axes.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=13,
                                   linewidth=1.2, color=colour, connectionstyle=connection,
                                   linestyle=linestyle, shrinkA=0, shrinkB=0))
    if text:
        mid_x = (start[0] + end[0]) / 2 + text_offset[0]
        mid_y = (start[1] + end[1]) / 2 + text_offset[1]
        axes.text(mid_x, mid_y, text, ha="center", va="bottom", fontsize=8.5, color="#333333")


def draw_training(axes) -> None:
    """Top panel: a pair of images through the shared backbone and the relational transformer."""
    axes.text(1, 56, "Training: is the pair of the same class?", fontsize=13, weight="bold",
              va="center")
    y_i, y_j = 48, 34
    for y, name in ((y_i, "i"), (y_j, "j")):
        box(axes, 4.5, y, 7, 6, f"image $x_{name}$", "image")
        arrow(axes, (8, y), (10.5, y))
        box(axes, 15.5, y, 10, 6, "ResNet-18", "backbone")
        arrow(axes, (20.5, y), (23, y))
        box(axes, 27, y, 8, 6, f"$f_{name}$\n{FEAT_DIM}-d", "feature")
        arrow(axes, (31, y), (33.5, y))
        box(axes, 39, y, 11, 6, f"Linear\n{FEAT_DIM}→{EMBED_DIM}", "proj")
        arrow(axes, (44.5, y), (47, y))
        box(axes, 50.5, y, 7, 6, f"$z_{name}$\n{EMBED_DIM}-d", "token")
    # Shared weights: dashed links between the two copies of each shared module.
    for x in (15.5, 39):
        arrow(axes, (x, y_i - 3), (x, y_j + 3), style="<|-|>", colour="#777777", linestyle="--")
        axes.text(x + 0.8, (y_i + y_j) / 2, "shared", fontsize=8.5, color="#555555", va="center")
    box(axes, 50.5, (y_i + y_j) / 2, 7, 4.4, "[cls]\nlearnable", "token", fontsize=8.5)
    _transformer_column(axes, y_i, y_j)


def _transformer_column(axes, y_i: float, y_j: float) -> None:
    """The relational module after the tokens: ViT blocks, LayerNorm, head, bounded output."""
    y = (y_i + y_j) / 2
    axes.add_patch(FancyBboxPatch((57, y_j - 3), 12, y_i - y_j + 6,
                                  boxstyle="round,pad=0.02,rounding_size=0.8", linewidth=1.2,
                                  edgecolor="#444444", facecolor=COLOURS["transformer"]))
    axes.text(63, y, "4 × ViT block\n12 heads\nMLP 4×\n\non tokens\n[cls, $z_i$, $z_j$]",
              ha="center", va="center", fontsize=9.5, linespacing=1.3)
    for token_y in (y_i, y, y_j):
        arrow(axes, (54, token_y), (57, token_y))
    arrow(axes, (69, y), (71.5, y))
    box(axes, 75.5, y, 8, 6, "LayerNorm", "transformer", fontsize=9.5)
    arrow(axes, (79.5, y), (82, y))
    box(axes, 86, y, 8, 6, "head on\n[cls]\n768→1", "transformer", fontsize=9.5)
    arrow(axes, (90, y), (92.5, y), text="$x$", text_offset=(0.0, 0.3))
    box(axes, 100.5, y, 16, 11,
        "$e\\,\\sigma(c\\,x) - e/2$\n($e=2,\\ c=10$)\n\nsame class → −1\ndifferent → +1",
        "output", fontsize=9.5)
    axes.text(100.5, y - 7.5, "L2 loss to the target", ha="center", va="center", fontsize=8.5,
              color="#333333")


def draw_testing(axes) -> None:
    """Bottom panel: target feature against class prototypes, softmax over classes, max."""
    axes.text(1, 23, "Test: compare a target with the known-class prototypes", fontsize=13,
              weight="bold", va="center")
    y_sup, y_tgt = 16, 5
    box(axes, 7, y_sup, 12, 6, "support images\nof $K$ known classes", "image", fontsize=9)
    box(axes, 7, y_tgt, 12, 6, "target image $t$", "image", fontsize=9)
    for y, feat in ((y_sup, f"features\n{FEAT_DIM}-d"), (y_tgt, f"$f_t$  {FEAT_DIM}-d")):
        arrow(axes, (13, y), (16, y))
        box(axes, 22, y, 12, 6, "ResNet-18", "backbone")
        arrow(axes, (28, y), (31, y))
        box(axes, 37, y, 12, 6, feat, "feature", fontsize=9.5)
    arrow(axes, (43, y_sup), (46, y_sup))
    box(axes, 53, y_sup, 14, 6, "prototypes $p_k$\n= class mean", "feature", fontsize=9.5)
    box(axes, 53, y_tgt + 0.5, 12, 5, "pairs ($f_t$, $p_k$)\n$k = 1..K$", "token", fontsize=9.5)
    arrow(axes, (43, y_tgt), (47, y_tgt))
    arrow(axes, (53, y_sup - 3), (53, y_tgt + 3))
    arrow(axes, (59, y_tgt + 0.5), (63, y_tgt + 0.5))
    box(axes, 70, y_tgt + 0.5, 14, 6, "relational module\n(as above) → $o_k$", "transformer",
        fontsize=9.5)
    arrow(axes, (77, y_tgt + 0.5), (80, y_tgt + 0.5))
    box(axes, 87, y_tgt + 0.5, 14, 6, "softmax over $k$\nof $-o_k$", "score", fontsize=9.5)
    arrow(axes, (94, y_tgt + 0.5), (97, y_tgt + 0.5))
    box(axes, 103.5, y_tgt + 0.5, 13, 6, "normality = max\nclass = argmax", "score",
        fontsize=9.5)


def make_figure() -> Figure:
    """The two-panel architecture figure."""
    figure = Figure(figsize=(15, 8))
    FigureCanvasAgg(figure)
    axes = figure.add_axes((0.01, 0.01, 0.98, 0.98))
    axes.set_xlim(0, 111)
    axes.set_ylim(0, 59)
    axes.axis("off")
    axes.plot([1, 110], [28.5, 28.5], color="#aaaaaa", linewidth=1, linestyle=":")
    draw_training(axes)
    draw_testing(axes)
    return figure


def main(argv: list[str] | None = None) -> int:
    """Write the figure (atomically) to --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    with atomic_open(out, "wb") as stream:
        make_figure().savefig(stream, format="png", dpi=110)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
