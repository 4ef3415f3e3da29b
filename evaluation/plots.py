"""Figures of evaluation results: ROC curves and known/unknown normality histograms, as PNG files.

The inputs are `evaluation.evaluate.EvalResult` objects or anything with the same attributes
(`dataset, target, scorer, normality, labels, known_classes, metrics['auroc']`); known (label <
known_classes) is the positive class. `plots_from_eval_dir` rebuilds the figures from the files of
one result group (`<run>/eval/<group>/`: `<stem>.json` and `<stem>_scores.csv`; the manifest and
summary files are not read), so `media/` can be regenerated from a run.
Figures are plain matplotlib Figures written as PNG (Agg renders them): no pyplot, no display and no global
backend switch.
"""
import csv
import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from utils.atomic_files import atomic_open

SCORES_SUFFIX = "_scores.csv"
_CSV_COLUMNS = ("path", "label", "known", "normality", "pred")
_HISTOGRAM_BINS = 30
_PANELS_PER_ROW = 3
# Okabe & Ito's colour-blind-safe palette (black left out: the chance line is grey, text is black).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442")
# With more curves than colours the line style changes, so no two curves look alike.
LINE_STYLES = ("-", "--", ":", "-.")
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
    """`dataset/target scorer`: every curve and panel names what it shows."""
    return f"{result.dataset}/{result.target} {result.scorer}"


def curve_style(index: int) -> tuple[str, str]:
    """(colour, line style) of the index-th curve: distinct for up to len(PALETTE) * len(LINE_STYLES) curves."""
    if index >= len(PALETTE) * len(LINE_STYLES):
        raise ValueError(f"at most {len(PALETTE) * len(LINE_STYLES)} curves can be told apart in one figure; "
                         f"got a {index + 1}th")
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


def _save_figure(figure: Figure, path: str) -> str:
    """Render `figure` to a PNG at `path` via a temporary file; returns the path."""
    with atomic_open(path, "wb") as out:
        figure.savefig(out, format="png", dpi=120)
    return path


def plot_roc(results: Sequence[Any], path: str) -> str:
    """One ROC curve per result (known = positive), AUROC in the legend; writes a PNG."""
    _require_results(results)
    figure = Figure(figsize=(6, 5.5))
    axes = figure.add_subplot(1, 1, 1)
    for index, result in enumerate(results):
        is_known = _known_mask(result)
        if result.metrics.get("auroc") is None:
            raise ValueError(f"{_title(result)}: metrics has no 'auroc'")
        fpr, tpr, _ = roc_curve(is_known, result.normality)
        colour, style = curve_style(index)
        axes.plot(fpr, tpr, linewidth=1.6, color=colour, linestyle=style,
                  label=f"{_title(result)}  AUROC {100 * result.metrics['auroc']:.2f}")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.01)
    axes.set_xlabel("false positive rate (unknown accepted as known)")
    axes.set_ylabel("true positive rate (known accepted)")
    axes.set_title("ROC, known = positive")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    return _save_figure(figure, path)


def plot_score_histograms(results: Sequence[Any], path: str) -> str:
    """One panel per result with the known and unknown normality histograms; writes a PNG."""
    _require_results(results)
    n_cols = min(_PANELS_PER_ROW, len(results))
    n_rows = math.ceil(len(results) / n_cols)
    figure = Figure(figsize=(4.2 * n_cols, 3.4 * n_rows))
    for index, result in enumerate(results):
        is_known = _known_mask(result)
        normality = np.asarray(result.normality)
        # Shared bins so the two histograms are comparable bar for bar.
        bins = np.histogram_bin_edges(normality, bins=_HISTOGRAM_BINS)
        axes = figure.add_subplot(n_rows, n_cols, index + 1)
        axes.hist(normality[is_known], bins=bins, density=True, alpha=0.6, color=KNOWN_COLOUR,
                  label=f"known ({int(is_known.sum())})")
        axes.hist(normality[~is_known], bins=bins, density=True, alpha=0.6, color=UNKNOWN_COLOUR,
                  label=f"unknown ({int((~is_known).sum())})")
        auroc = result.metrics.get("auroc")
        suffix = "" if auroc is None else f"  AUROC {100 * auroc:.2f}"
        axes.set_title(f"{_title(result)}{suffix}", fontsize=9)
        axes.set_xlabel("normality")
        axes.set_ylabel("density")
        axes.legend(fontsize=8)
    figure.tight_layout()
    return _save_figure(figure, path)


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


def plots_from_eval_dir(eval_dir: str, out_dir: str) -> List[str]:
    """Write `roc_<dataset>.png` and `scores_<dataset>.png` per dataset of an eval folder."""
    by_dataset: Dict[str, List[PlotRecord]] = defaultdict(list)
    for record in read_eval_dir(eval_dir):
        by_dataset[record.dataset].append(record)
    written = []
    for dataset, records in sorted(by_dataset.items()):
        written.append(plot_roc(records, os.path.join(out_dir, f"roc_{dataset}.png")))
        written.append(plot_score_histograms(records, os.path.join(out_dir, f"scores_{dataset}.png")))
    return written
