"""Figures of anomaly maps: the most novel and the most normal scored images with their novelty maps overlaid.

A scorer that maps (`prototype_map`) returns one novelty map per scored image (`ScoreResult.maps`,
kept as `EvalResult.maps`, [M, h, w], higher = more novel). `plot_novelty_maps` draws the N scored
images of lowest normality (top row) and the N of highest normality (bottom row), each resized to a
square as the evaluation transform does, with its map upsampled bilinearly on top; one colour scale
for every panel, so that panels compare. Plain matplotlib Figures written as PNG (no pyplot).
"""
from typing import Any, Callable, List, Sequence, Tuple

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from datasets.image_lists import load_image
from utils.atomic_files import atomic_open

PANEL_PIXELS = 160  # side of each image panel


def map_figure_name(result: Any) -> str:
    """`maps_<dataset>_<target>.png` (the scorer added unless it is prototype_map)."""
    suffix = "" if result.scorer == "prototype_map" else f"_{result.scorer}"
    return f"maps_{result.dataset}_{result.target}{suffix}.png"


def extreme_indices(normality: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(the n most novel, the n most normal) sample indices: lowest and highest normality, ties by index."""
    normality = np.asarray(normality, dtype=np.float64)
    order = np.argsort(normality, kind="stable")
    n = min(n, normality.size)
    return order[:n], order[::-1][:n] if n else order[:0]


def _panel(path: str, side: int) -> np.ndarray:
    """The image at `path` resized to side x side (as the evaluation transform resizes), as RGB floats."""
    # A scored image: a truncated one got this far only under --load_truncated_images, and is drawn as scored.
    image = load_image(path, load_truncated=True).resize((side, side), Image.BILINEAR)
    return np.asarray(image, dtype=np.float32) / 255.0


def _upsample(novelty: np.ndarray, side: int) -> np.ndarray:
    """A [h, w] map resized bilinearly to side x side."""
    image = Image.fromarray(np.ascontiguousarray(novelty, dtype=np.float32))
    return np.asarray(image.resize((side, side), Image.BILINEAR))


def plot_novelty_maps(result: Any, n: int, path: str, side: int = PANEL_PIXELS) -> str:
    """Write the figure of the n most novel and n most normal scored images of `result`; returns `path`.

    `result` has `maps` [M, h, w], `normality` [M], `labels` [M], `known_classes`, `paths`, `dataset`,
    `target`, `scorer` (an EvalResult). Titles give each image's normality and whether it is known.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    maps = getattr(result, "maps", None)
    if maps is None:
        raise ValueError(f"{result.dataset}/{result.target} ({result.scorer}) has no novelty maps")
    maps = np.asarray(maps, dtype=np.float32)
    normality = np.asarray(result.normality, dtype=np.float64)
    if maps.ndim != 3 or maps.shape[0] != normality.shape[0] or len(result.paths) != normality.shape[0]:
        raise ValueError(f"maps {maps.shape}, normality {normality.shape} and {len(result.paths)} paths disagree")
    novel, normal = extreme_indices(normality, int(n))
    shown = np.r_[novel, normal]
    vmax = float(max(maps[shown].max(), 1e-6))
    columns = len(novel)
    figure = Figure(figsize=(2.1 * columns + 0.9, 4.9))
    for row, (indices, label) in enumerate(((novel, "most novel"), (normal, "most normal"))):
        for column, index in enumerate(indices):
            axes = figure.add_subplot(2, columns, row * columns + column + 1)
            axes.imshow(_panel(result.paths[index], side))
            overlay = axes.imshow(_upsample(maps[index], side), cmap="inferno", alpha=0.5, vmin=0.0, vmax=vmax)
            known = int(result.labels[index]) < result.known_classes
            axes.set_title(f"{normality[index]:.3f} {'known' if known else 'unknown'}", fontsize=8,
                           color="tab:green" if known else "tab:red")
            axes.set_xticks([])
            axes.set_yticks([])
            if column == 0:
                axes.set_ylabel(label, fontsize=9)
    figure.colorbar(overlay, ax=figure.axes, fraction=0.02, pad=0.02, label="novelty (1 - best cosine)")
    figure.suptitle(f"{result.dataset}/{result.target} ({result.scorer}): normality, known/unknown", fontsize=10)
    with atomic_open(path, "wb") as out:
        figure.savefig(out, format="png", dpi=100)
    return path


def map_figures(results: Sequence[Any], n: int) -> List[Tuple[str, Callable[[str], str]]]:
    """(file name, draw(path)) of the figure of every result with maps; none for n = 0 (the default of --save_maps)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if n == 0:
        return []
    return [(map_figure_name(result), lambda path, result=result: plot_novelty_maps(result, n, path))
            for result in results if getattr(result, "maps", None) is not None]

