"""Figures of evaluation results: ROC curves and known/unknown normality histograms, as PNG files.

The inputs are `evaluation.evaluate.EvalResult` objects or anything with the same attributes
(`dataset, target, scorer, normality, labels, known_classes, metrics['auroc']`); known (label <
known_classes) is the positive class. The layouts grow with the number of scorers and targets:

- ROC (`plot_roc`): one panel per dataset/target, one curve per scorer, labelled with the scorer and
  its AUROC in a legend to the right of the panel. A scorer has the same colour and line style in
  every panel; beyond MAX_CURVES scorers (the looks that can be told apart) a target's curves are
  split over several panels, `(1/2)`, `(2/2)`.
- Histograms (`plot_score_histograms`): one panel per scorer and dataset/target, titled with both and
  the AUROC; scorers run down the rows, targets across the columns, and with few targets the
  scorers wrap into blocks of columns side by side (`histogram_grid`).

What a figure shows (its title, each panel's title and legend entries) is also written as JSON into
the PNG's text metadata under FIGURE_CONTENTS_KEY, so that it can be checked without looking.
`result_figures` names the figures of a result group (`roc_<dataset>.png`, `scores_<dataset>.png`);
`read_eval_dir` rebuilds the results from a group's files, so `media/` can be redrawn from a run.
Figures are plain matplotlib Figures written as PNG (Agg renders them): no pyplot, no display and no
global backend switch.
"""
import csv
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from sklearn.metrics import roc_curve

from utils.atomic_files import atomic_open

SCORES_SUFFIX = "_scores.csv"
_CSV_COLUMNS = ("path", "label", "known", "normality", "pred")
_HISTOGRAM_BINS = 30
_ROC_PANELS_PER_ROW = 2
# Histogram columns a figure aims at: scorers wrap into blocks side by side up to this many.
_HISTOGRAM_COLUMNS = 4
# A legend longer than this gets two columns, so that it stays about as tall as its panel.
_LEGEND_ROWS = 24
FIGURE_CONTENTS_KEY = "figure_contents"
# Okabe & Ito's colour-blind-safe palette (black left out: the chance line is grey, text is black).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442")
# With more curves than colours the line style changes, so no two curves of a panel look alike.
LINE_STYLES = ("-", "--", ":", "-.")
MAX_CURVES = len(PALETTE) * len(LINE_STYLES)
KNOWN_COLOUR, UNKNOWN_COLOUR = PALETTE[0], PALETTE[3]


@dataclass
class PlotRecord:
    """The attributes of an EvalResult that the figures use, as read back from an eval folder."""

    dataset: str
    target: str
    scorer: str
    normality: np.ndarray
    labels: np.ndarray
    known_classes: int
    metrics: Dict[str, Any] = field(default_factory=dict)


def _title(result: Any) -> str:
    """`dataset/target scorer`: names a result in error messages."""
    return f"{result.dataset}/{result.target} {result.scorer}"


def curve_style(index: int) -> Tuple[str, str]:
    """(colour, line style) of the index-th curve of a panel: distinct for up to MAX_CURVES curves."""
    if not 0 <= index < MAX_CURVES:
        raise ValueError(f"curve index {index} out of range: a panel holds at most {MAX_CURVES} curves")
    return PALETTE[index % len(PALETTE)], LINE_STYLES[index // len(PALETTE)]


def _known_mask(result: Any) -> np.ndarray:
    """Boolean mask of the known samples; ValueError unless both known and unknown ones exist."""
    normality = np.asarray(result.normality)
    labels = np.asarray(result.labels)
    if normality.shape != labels.shape or normality.ndim != 1:
        raise ValueError(f"{_title(result)}: normality {normality.shape} and labels {labels.shape} "
                         f"must be 1-d arrays of the same length")
    is_known = labels < result.known_classes
    if is_known.all() or not is_known.any():
        raise ValueError(f"{_title(result)}: needs both known and unknown samples, got "
                         f"{int(is_known.sum())} known of {len(is_known)}")
    return is_known


def _require_results(results: Sequence[Any]) -> None:
    """ValueError for an empty result list."""
    if not results:
        raise ValueError("no results to plot")


def _scorers(results: Sequence[Any]) -> List[str]:
    """The scorers of `results`, in order of first appearance."""
    return list(dict.fromkeys(result.scorer for result in results))


def _by_target(results: Sequence[Any]) -> Dict[Tuple[str, str], Dict[str, Any]]:
    """{(dataset, target): {scorer: result}} in order of first appearance; ValueError on a repeated result."""
    table: Dict[Tuple[str, str], Dict[str, Any]] = {}
    for result in results:
        column = table.setdefault((result.dataset, result.target), {})
        if result.scorer in column:
            raise ValueError(f"{_title(result)}: two results to plot")
        column[result.scorer] = result
    return table


def _figure_title(results: Sequence[Any], what: str) -> str:
    """`<dataset>: <what>` (datasets joined by ', ' when there are several)."""
    return f"{', '.join(dict.fromkeys(result.dataset for result in results))}: {what}"


def _percent(value: float) -> str:
    """An AUROC as shown in the figures: `AUROC 93.12`."""
    return f"AUROC {100 * value:.2f}"


def _save_figure(figure: Figure, path: str, contents: Dict[str, Any], dpi: int, tight: bool) -> str:
    """Render `figure` to a PNG at `path` via a temporary file, `contents` in its text metadata; returns the path.

    `tight`: the image is cropped or grown to the drawn content (a legend outside the axes is inside
    the image), at the cost of drawing the figure twice.
    """
    with atomic_open(path, "wb") as out:
        figure.savefig(out, format="png", dpi=dpi, metadata={FIGURE_CONTENTS_KEY: json.dumps(contents)},
                       **({"bbox_inches": "tight", "pad_inches": 0.15} if tight else {}))
    return path


def roc_panels(results: Sequence[Any]) -> List[Tuple[str, List[Tuple[int, Any]]]]:
    """(panel title, [(curve index, result)]) per dataset/target; more than MAX_CURVES scorers take several panels.

    A scorer's curve index (its colour and line style) is the same in every panel.
    """
    scorers = _scorers(results)
    n_parts = math.ceil(len(scorers) / MAX_CURVES)
    position = {scorer: index for index, scorer in enumerate(scorers)}
    panels = []
    for (dataset, target), column in _by_target(results).items():
        for part in range(n_parts):
            curves = [(position[scorer] % MAX_CURVES, result) for scorer, result in column.items()
                      if position[scorer] // MAX_CURVES == part]
            if curves:
                suffix = f" ({part + 1}/{n_parts})" if n_parts > 1 else ""
                panels.append((f"{dataset}/{target}{suffix}", sorted(curves, key=lambda curve: curve[0])))
    return panels


def plot_roc(results: Sequence[Any], path: str) -> str:
    """ROC curves (known = positive), one panel per dataset/target, one curve per scorer; writes a PNG."""
    _require_results(results)
    for result in results:
        _known_mask(result)
        if result.metrics.get("auroc") is None:
            raise ValueError(f"{_title(result)}: metrics has no 'auroc'")
    panels = roc_panels(results)
    n_cols = min(_ROC_PANELS_PER_ROW, len(panels))
    n_rows = math.ceil(len(panels) / n_cols)
    figure = Figure(figsize=(6.6 * n_cols, 4.4 * n_rows + 0.4), layout="constrained")
    title = _figure_title(results, "ROC per target, known = positive")
    contents: Dict[str, Any] = {"figure": "roc", "title": title, "panels": []}
    for index, (panel_title, curves) in enumerate(panels):
        axes = figure.add_subplot(n_rows, n_cols, index + 1)
        for curve_index, result in curves:
            fpr, tpr, _ = roc_curve(_known_mask(result), result.normality)
            colour, style = curve_style(curve_index)
            axes.plot(fpr, tpr, linewidth=1.6, color=colour, linestyle=style,
                      label=f"{result.scorer}  {_percent(result.metrics['auroc'])}")
        axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1.01)
        axes.set_xlabel("false positive rate (unknown accepted as known)", fontsize=9)
        axes.set_ylabel("true positive rate (known accepted)", fontsize=9)
        axes.set_title(panel_title, fontsize=11)
        axes.grid(alpha=0.3)
        # Outside the axes, on the right: the legend never covers a curve.
        legend = axes.legend(loc="upper left", bbox_to_anchor=(1.03, 1.0), borderaxespad=0.0, fontsize=8,
                             ncols=1 if len(curves) + 1 <= _LEGEND_ROWS else 2)
        contents["panels"].append({"title": panel_title, "legend": [text.get_text() for text in legend.get_texts()]})
    figure.suptitle(title, fontsize=12)
    return _save_figure(figure, path, contents, dpi=120, tight=True)


def histogram_grid(n_scorers: int, n_targets: int) -> Tuple[int, int]:
    """(rows, blocks): scorers run down the rows; with few targets they wrap into blocks of columns side by side.

    Each block has one column per target, so that a figure with many scorers stays about as wide as tall.
    """
    blocks = max(1, min(_HISTOGRAM_COLUMNS // n_targets, n_scorers))
    return math.ceil(n_scorers / blocks), blocks


def plot_score_histograms(results: Sequence[Any], path: str) -> str:
    """Known and unknown normality histograms, one panel per scorer and dataset/target; writes a PNG.

    Scorers run down the rows, targets across the columns (see `histogram_grid`); each panel's title
    names its dataset/target, scorer and AUROC.
    """
    _require_results(results)
    for result in results:
        _known_mask(result)
    table = _by_target(results)
    scorers = _scorers(results)
    n_rows, n_blocks = histogram_grid(len(scorers), len(table))
    n_cols = n_blocks * len(table)
    # A fixed layout in inches (constrained layout costs seconds on a grid of dozens of panels).
    panel_width, panel_height, left, right, top, bottom = 3.9, 2.3, 0.6, 0.2, 1.05, 0.5
    # At least wide enough for the title and the legend above the panels.
    width, height = max(6.5, left + right + n_cols * panel_width), top + bottom + n_rows * panel_height
    figure = Figure(figsize=(width, height))
    grid = figure.add_gridspec(n_rows, n_cols, left=left / width, right=1 - right / width, bottom=bottom / height,
                               top=1 - top / height, wspace=0.25, hspace=0.6)
    title = _figure_title(results, "normality of known and unknown samples")
    contents: Dict[str, Any] = {"figure": "score_histograms", "title": title,
                                "legend": ["known (label < known classes)", "unknown"], "panels": []}
    for scorer_index, scorer in enumerate(scorers):
        row, block = scorer_index % n_rows, scorer_index // n_rows
        for target_index, ((dataset, target), column) in enumerate(table.items()):
            result = column.get(scorer)
            if result is None:
                continue  # this scorer did not score this target: the cell stays empty
            axes = figure.add_subplot(grid[row, block * len(table) + target_index])
            is_known = _known_mask(result)
            normality = np.asarray(result.normality)
            # Shared bins so the two histograms are comparable bar for bar.
            bins = np.histogram_bin_edges(normality, bins=_HISTOGRAM_BINS)
            axes.hist(normality[is_known], bins=bins, density=True, alpha=0.6, color=KNOWN_COLOUR,
                      histtype="stepfilled")
            axes.hist(normality[~is_known], bins=bins, density=True, alpha=0.6, color=UNKNOWN_COLOUR,
                      histtype="stepfilled")
            auroc = result.metrics.get("auroc")
            panel_title = f"{dataset}/{target} {scorer}" + ("" if auroc is None else f"  {_percent(auroc)}")
            axes.set_title(panel_title, fontsize=9)
            axes.tick_params(labelsize=7)
            axes.locator_params(nbins=5)
            axes.set_xlabel("normality", fontsize=8, labelpad=1)
            if block == 0 and target_index == 0:
                axes.set_ylabel("density", fontsize=8)
            contents["panels"].append({"title": panel_title, "known": int(is_known.sum()),
                                       "unknown": int((~is_known).sum())})
    handles = [Patch(color=KNOWN_COLOUR, alpha=0.6), Patch(color=UNKNOWN_COLOUR, alpha=0.6)]
    figure.suptitle(title, fontsize=11, y=1 - 0.12 / height, va="top")
    figure.legend(handles, contents["legend"], loc="upper center",
                  bbox_to_anchor=(0.5, 1 - 0.42 / height), ncols=2, fontsize=9, frameon=False)
    return _save_figure(figure, path, contents, dpi=100, tight=False)


def _read_scores_csv(csv_path: str, known_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, normality) of a `_scores.csv`; ValueError naming the file on bad content."""
    labels, normality = [], []
    with open(csv_path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != _CSV_COLUMNS:
            raise ValueError(f"{csv_path}: expected columns {','.join(_CSV_COLUMNS)}, got "
                             f"{reader.fieldnames}")
        for line_number, row in enumerate(reader, start=2):
            try:
                label, known, score = int(row["label"]), int(row["known"]), float(row["normality"])
            except (TypeError, ValueError):
                raise ValueError(f"{csv_path}, line {line_number}: bad row {row}") from None
            if known != int(label < known_classes):
                raise ValueError(f"{csv_path}, line {line_number}: known={known} contradicts label "
                                 f"{label} with {known_classes} known classes")
            labels.append(label)
            normality.append(score)
    if not labels:
        raise ValueError(f"{csv_path} has no rows")
    return np.array(labels, dtype=np.int64), np.array(normality, dtype=np.float64)


def read_eval_dir(eval_dir: str) -> List[PlotRecord]:
    """One PlotRecord per `<stem>_scores.csv` + `<stem>.json` pair of a result group folder, sorted by stem."""
    if not os.path.isdir(eval_dir):
        raise FileNotFoundError(f"evaluation folder not found: {eval_dir}")
    stems = sorted(name[:-len(SCORES_SUFFIX)] for name in os.listdir(eval_dir)
                   if name.endswith(SCORES_SUFFIX) and not name.startswith("."))
    if not stems:
        raise FileNotFoundError(f"no *{SCORES_SUFFIX} files in {eval_dir}")
    records = []
    for stem in stems:
        json_path = os.path.join(eval_dir, f"{stem}.json")
        if not os.path.isfile(json_path):
            raise FileNotFoundError(f"{os.path.join(eval_dir, stem + SCORES_SUFFIX)} has no "
                                    f"matching {json_path}")
        with open(json_path, encoding="utf-8") as handle:
            record = json.load(handle)
        missing = [key for key in ("dataset", "target", "scorer", "known_classes", "auroc")
                   if key not in record]
        if missing:
            raise ValueError(f"{json_path} lacks the keys {missing}")
        labels, normality = _read_scores_csv(os.path.join(eval_dir, stem + SCORES_SUFFIX),
                                             int(record["known_classes"]))
        metrics = {key: value for key, value in record.items()
                   if key in ("auroc", "fpr95", "aupr_in", "aupr_out", "closed_set_acc")}
        records.append(PlotRecord(dataset=record["dataset"], target=record["target"],
                                  scorer=record["scorer"], normality=normality, labels=labels,
                                  known_classes=int(record["known_classes"]), metrics=metrics))
    return records


def result_figures(results: Sequence[Any]) -> List[Tuple[str, Callable[[str], str]]]:
    """(file name, draw(path)) of every figure of a result group: `roc_<dataset>.png`, `scores_<dataset>.png`."""
    by_dataset: Dict[str, List[Any]] = {}
    for result in results:
        by_dataset.setdefault(result.dataset, []).append(result)
    figures: List[Tuple[str, Callable[[str], str]]] = []
    for dataset, members in by_dataset.items():
        figures.append((f"roc_{dataset}.png", lambda path, members=members: plot_roc(members, path)))
        figures.append((f"scores_{dataset}.png", lambda path, members=members: plot_score_histograms(members, path)))
    return figures
