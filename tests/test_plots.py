"""Evaluation figures: ROC panels and histogram grids as PNGs, from results and from an eval folder's files."""
import itertools
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from cycler import cycler
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox
from PIL import Image

from evaluation.plots import (
    FIGURE_CONTENTS_KEY,
    MAX_CURVES,
    curve_style,
    histogram_grid,
    plot_roc,
    plot_score_histograms,
    read_eval_dir,
    result_figures,
    roc_panels,
)

OKABE_ITO = {"#0072b2", "#e69f00", "#009e73", "#d55e00", "#cc79a7", "#56b4e9", "#f0e442"}
# --evaluator all (the scorer registry at the time of writing): 16 scorers.
SIXTEEN = ("resend", "resend_msp", "resend_knn", "prototype_cosine", "prototype_distance", "knn", "mahalanobis",
           "featurenorm", "linear_probe", "energy", "max_logit", "react", "ash_b", "flow", "latent_vae",
           "prototype_map")


@dataclass
class FakeResult:
    """The attributes of EvalResult that the figures read."""

    dataset: str
    target: str
    scorer: str
    normality: np.ndarray
    labels: np.ndarray
    known_classes: int
    metrics: dict = field(default_factory=dict)


def _result(target: str, shift: float, seed: int, scorer: str = "resend") -> FakeResult:
    rng = np.random.default_rng(seed)
    labels = np.array([0, 1, 2] * 10 + [3, 4] * 10)
    normality = rng.normal(size=len(labels)) + shift * (labels < 3)
    return FakeResult("Digits", target, scorer, normality, labels, 3, {"auroc": 0.8})


def figure_contents(path) -> dict:
    """What a figure shows, as embedded in its PNG text metadata."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        return json.loads(image.text[FIGURE_CONTENTS_KEY])


def _png_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_plot_roc_and_histograms_write_pngs(tmp_path):
    results = [_result("seen", 2.0, 0), _result("novel", 0.5, 1)]
    roc = tmp_path / "new" / "roc.png"
    assert plot_roc(results, str(roc)) == str(roc)
    hist = tmp_path / "hist.png"
    assert plot_score_histograms(results, str(hist)) == str(hist)
    assert sorted(os.listdir(tmp_path)) == ["hist.png", "new"]  # no temporary files left
    assert os.listdir(tmp_path / "new") == ["roc.png"]
    # Two ROC panels side by side, each with its legend on the right; two histogram panels.
    width, height = _png_size(roc)
    assert 1200 < width < 2000 and 450 < height < 800, (width, height)
    assert _png_size(hist) == (860, 385)  # 0.8 + 2 x 3.9 inches by 1.55 + 2.3 inches at 100 dpi
    assert figure_contents(roc)["title"] == "Digits: ROC per target, known = positive"
    assert figure_contents(hist)["title"] == "Digits: normality of known and unknown samples"


# ---------------------------------------------------------------- the plotted data, read back

@pytest.fixture
def drawn(monkeypatch):
    """The Figures that the plotting functions save, in order (they are still written)."""
    figures = []
    real_savefig = Figure.savefig

    def recording_savefig(self, *args, **kwargs):
        figures.append(self)
        return real_savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording_savefig)
    return figures


def reference_roc(normality, is_known):
    """(FPR, TPR) at every threshold "known if score >= t", t over the distinct scores and +inf."""
    known, unknown = normality[is_known], normality[~is_known]
    thresholds = np.r_[np.inf, np.unique(normality)[::-1]]
    return (np.array([np.mean(unknown >= t) for t in thresholds]),
            np.array([np.mean(known >= t) for t in thresholds]))


def reference_auroc(normality, is_known):
    """Probability that a known sample outscores an unknown one, ties counting one half."""
    diff = normality[is_known][:, None] - normality[~is_known][None, :]
    return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def _scored(target, scorer, shift, seed, n_known=40, n_unknown=25, dataset="Digits"):
    """A result with tied scores (one decimal), AUROC in its metrics computed from the formula."""
    rng = np.random.default_rng(seed)
    labels = np.r_[rng.integers(0, 3, n_known), rng.integers(3, 6, n_unknown)]
    normality = np.round(rng.normal(size=len(labels)) + shift * (labels < 3), 1)
    result = FakeResult(dataset, target, scorer, normality, labels, 3)
    result.metrics = {"auroc": reference_auroc(normality, labels < 3)}
    return result


def _legend_labels(axes):
    return [text.get_text() for text in axes.get_legend().get_texts()]


def test_roc_panels_hold_each_targets_curves_known_positive(tmp_path, drawn):
    results = [_scored("seen", "resend", 1.5, 0), _scored("novel", "knn", 0.4, 1), _scored("novel", "resend", -0.8, 2)]
    aurocs = [r.metrics["auroc"] for r in results]
    # Curves far from chance and from each other, so that swapping known and unknown (AUROC -> 1 - AUROC)
    # or mixing up the results shows.
    assert aurocs[0] > 0.8 and 0.55 < aurocs[1] < 0.75 and aurocs[2] < 0.35
    plot_roc(results, str(tmp_path / "roc.png"))
    (figure,) = drawn
    seen_axes, novel_axes = figure.axes
    assert [axes.get_title() for axes in figure.axes] == ["Digits/seen", "Digits/novel"]
    # In each panel the scorers come in the order they first appear in the results (resend, then knn).
    expected = {"Digits/seen": [results[0]], "Digits/novel": [results[2], results[1]]}
    for axes in figure.axes:
        *curves, chance = axes.get_lines()
        panel_results = expected[axes.get_title()]
        assert len(curves) == len(panel_results)
        for result, line in zip(panel_results, curves):
            is_known = result.labels < result.known_classes
            fpr, tpr = line.get_xdata(), line.get_ydata()
            ref_fpr, ref_tpr = reference_roc(result.normality, is_known)
            # Every plotted point is an operating point of the result, from (0, 0) to (1, 1) ...
            assert (fpr[0], tpr[0]) == (0, 0) and (fpr[-1], tpr[-1]) == (1, 1)
            assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
            for x, y in zip(fpr, tpr):
                assert np.any(np.isclose(ref_fpr, x) & np.isclose(ref_tpr, y)), (x, y)
            # ... and the area under the plotted curve is the AUROC (points left out are collinear).
            assert np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2) == pytest.approx(
                reference_auroc(result.normality, is_known))
        assert list(chance.get_xdata()) == [0, 1] and list(chance.get_ydata()) == [0, 1]
        assert chance.get_linestyle() == "--"
        assert [line.get_label() for line in axes.get_lines()] == _legend_labels(axes)
        assert axes.get_xlabel() == "false positive rate (unknown accepted as known)"
        assert axes.get_ylabel() == "true positive rate (known accepted)"
        assert axes.get_xlim() == (0, 1) and axes.get_ylim() == (0, 1.01)
    # The legend names each curve's scorer and AUROC; the panel title names the dataset/target.
    assert _legend_labels(seen_axes) == [f"resend  AUROC {100 * aurocs[0]:.2f}", "chance"]
    assert _legend_labels(novel_axes) == [f"resend  AUROC {100 * aurocs[2]:.2f}",
                                          f"knn  AUROC {100 * aurocs[1]:.2f}", "chance"]
    # A scorer looks the same in every panel.
    assert seen_axes.get_lines()[0].get_color() == novel_axes.get_lines()[0].get_color() == "#0072B2"
    assert novel_axes.get_lines()[1].get_color() == "#E69F00"
    assert figure.get_suptitle() == "Digits: ROC per target, known = positive"
    # The same names are in the PNG, readable without drawing.
    assert figure_contents(tmp_path / "roc.png") == {
        "figure": "roc", "title": figure.get_suptitle(),
        "panels": [{"title": "Digits/seen", "legend": _legend_labels(seen_axes)},
                   {"title": "Digits/novel", "legend": _legend_labels(novel_axes)}]}


def test_roc_legend_takes_the_auroc_from_the_metrics(tmp_path, drawn):
    result = _scored("seen", "prototype_cosine", 1.0, 3)
    result.metrics = {"auroc": 0.12345}
    plot_roc([result], str(tmp_path / "roc.png"))
    assert _legend_labels(drawn[0].axes[0]) == ["prototype_cosine  AUROC 12.35", "chance"]


def _steps(polygon):
    """(bin edges, heights) of a stepfilled histogram: its outline runs (e0, 0), (e0, h0), (e1, h0), (e1, h1), ...

    then back along the bottom, 4 n + 1 points for n bins.
    """
    xy = polygon.get_xy()
    n_bins = (len(xy) - 1) // 4
    top = xy[1:2 * n_bins + 1]
    return np.r_[top[0, 0], top[1::2, 0]], top[0::2, 1]


def test_histograms_are_the_known_and_unknown_densities(tmp_path, drawn):
    results = [_scored("seen", "resend", 1.5, 0), _scored("novel", "resend", 0.4, 1, n_known=30, n_unknown=50),
               _scored("seen", "knn", 0.0, 2), _scored("novel", "knn", 3.0, 4)]
    plot_score_histograms(results, str(tmp_path / "hist.png"))
    (figure,) = drawn
    assert len(figure.axes) == 4
    titles = []
    for result, axes in zip(results, figure.axes):
        is_known = result.labels < result.known_classes
        normality = result.normality
        # 30 equal bins over the range of all scores, shared by both histograms.
        edges = np.linspace(normality.min(), normality.max(), 31)
        width = edges[1] - edges[0]
        known_polygon, unknown_polygon = axes.patches
        for polygon, mask in ((known_polygon, is_known), (unknown_polygon, ~is_known)):
            plotted_edges, heights = _steps(polygon)
            assert np.allclose(plotted_edges, edges)
            counts = [np.sum((normality[mask] >= lo) & ((normality[mask] < hi) | (hi == edges[-1])))
                      for lo, hi in itertools.pairwise(edges)]
            assert np.allclose(heights, np.array(counts) / (mask.sum() * width))
        title = f"Digits/{result.target} {result.scorer}  AUROC {100 * result.metrics['auroc']:.2f}"
        assert axes.get_title() == title
        assert axes.get_xlabel() == "normality"
        titles.append(title)
    # Scorers down the rows, targets across: 2 scorers on 2 targets wrap into 2 blocks, one row of 4 panels.
    assert [axes.get_subplotspec().get_geometry() for axes in figure.axes] == [
        (1, 4, 0, 0), (1, 4, 1, 1), (1, 4, 2, 2), (1, 4, 3, 3)]
    assert [axes.get_ylabel() for axes in figure.axes] == ["density", "", "", ""]
    (legend,) = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == ["known (label < known classes)", "unknown"]
    contents = figure_contents(tmp_path / "hist.png")
    assert [panel["title"] for panel in contents["panels"]] == titles
    assert [(panel["known"], panel["unknown"]) for panel in contents["panels"]] == [(40, 25), (30, 50), (40, 25),
                                                                                    (40, 25)]
    assert contents["legend"] == ["known (label < known classes)", "unknown"]


def test_histogram_grid_wraps_scorers_into_blocks_of_columns():
    assert histogram_grid(1, 1) == (1, 1)
    assert histogram_grid(16, 2) == (8, 2)  # --evaluator all on Digits: 8 rows of 2 blocks x 2 targets
    assert histogram_grid(16, 4) == (16, 1)  # PACS: one column per target
    assert histogram_grid(3, 1) == (1, 3)
    assert histogram_grid(40, 1) == (10, 4)
    assert histogram_grid(2, 5) == (2, 1)


def test_histogram_title_without_auroc_and_a_missing_panel(tmp_path, drawn):
    result = _scored("seen", "resend", 1.0, 5)
    result.metrics = {}
    other = _scored("novel", "knn", 1.0, 6)
    plot_score_histograms([result, other], str(tmp_path / "hist.png"))
    # knn did not score seen, resend not novel: two panels of a 1 x 4 grid (2 blocks), the other cells empty.
    assert [axes.get_title() for axes in drawn[0].axes] == ["Digits/seen resend",
                                                           f"Digits/novel knn  AUROC {100 * other.metrics['auroc']:.2f}"]
    assert [axes.get_subplotspec().get_geometry() for axes in drawn[0].axes] == [(1, 4, 0, 0), (1, 4, 3, 3)]


def test_plots_refuse_bad_results(tmp_path):
    one_sided = _result("seen", 1.0, 0)
    one_sided.labels = np.zeros_like(one_sided.labels)
    with pytest.raises(ValueError, match=r"^Digits/seen resend: needs both known and unknown samples, got 50 known of 50$"):
        plot_roc([one_sided], str(tmp_path / "roc.png"))
    one_sided.labels = np.full_like(one_sided.labels, 3)
    one_sided.scorer = "knn"
    with pytest.raises(ValueError, match=r"^Digits/seen knn: needs both known and unknown samples, got 0 known of 50$"):
        plot_score_histograms([one_sided], str(tmp_path / "hist.png"))
    short = _result("seen", 1.0, 0)
    short.labels = short.labels[:-1]
    with pytest.raises(ValueError, match=r"^Digits/seen resend: normality \(50,\) and labels \(49,\) must be 1-d arrays "
                                         r"of the same length$"):
        plot_roc([short], str(tmp_path / "roc.png"))
    flat = _result("seen", 1.0, 0)
    flat.normality, flat.labels = flat.normality.reshape(5, 10), flat.labels.reshape(5, 10)
    with pytest.raises(ValueError, match=r"^Digits/seen resend: normality \(5, 10\) and labels \(5, 10\) must be 1-d"):
        plot_score_histograms([flat], str(tmp_path / "hist.png"))
    no_auroc = _result("novel", 1.0, 0)
    no_auroc.metrics = {}
    with pytest.raises(ValueError, match="^Digits/novel resend: metrics has no 'auroc'$"):
        plot_roc([_result("seen", 1.0, 0), no_auroc], str(tmp_path / "roc.png"))
    twice = [_result("novel", 1.0, 0), _result("novel", 2.0, 1)]
    for plot in (plot_roc, plot_score_histograms):
        with pytest.raises(ValueError, match="^Digits/novel resend: two results to plot$"):
            plot(twice, str(tmp_path / "twice.png"))
        with pytest.raises(ValueError, match="^no results to plot$"):
            plot([], str(tmp_path / "none.png"))
    assert not os.listdir(tmp_path)


def test_curve_styles_are_distinct_and_bounded():
    looks = [curve_style(index) for index in range(MAX_CURVES)]
    assert MAX_CURVES == 28 and len(set(looks)) == 28
    assert {matplotlib.colors.to_hex(colour) for colour, _ in looks} == OKABE_ITO
    with pytest.raises(ValueError, match="^curve index 28 out of range: a panel holds at most 28 curves$"):
        curve_style(28)


# ---------------------------------------------------------------- many scorers and targets

def _grid(scorers, targets, dataset="PACS_DG"):
    return [_scored(target, scorer, 0.1 * (i % 9), 10 * i + j, n_known=30, n_unknown=20, dataset=dataset)
            for j, target in enumerate(targets) for i, scorer in enumerate(scorers)]


def _overlap(a: Bbox, b: Bbox) -> bool:
    """Whether two boxes share more than a pixel's width of area."""
    return min(a.x1, b.x1) - max(a.x0, b.x0) > 1 and min(a.y1, b.y1) - max(a.y0, b.y0) > 1


def _check_nothing_covers_anything(figure):
    """Legends, titles and panels lie apart: no legend on a curve, no title cut or covered."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()  # lays the figure out as savefig does
    renderer = canvas.get_renderer()
    panels = [axes.get_window_extent(renderer) for axes in figure.axes]
    legends = [axes.get_legend().get_window_extent(renderer) for axes in figure.axes if axes.get_legend()]
    legends += [legend.get_window_extent(renderer) for legend in figure.legends]
    titles = [axes.title.get_window_extent(renderer) for axes in figure.axes]
    titles.append(figure._suptitle.get_window_extent(renderer))
    for legend in legends:
        assert not any(_overlap(legend, panel) for panel in panels)
    for title in titles:
        assert not any(_overlap(title, box) for box in panels + legends)
    for first, second in itertools.combinations(panels, 2):
        assert not _overlap(first, second)
    return panels, legends, titles


def test_sixteen_scorers_on_two_and_four_targets(tmp_path, drawn):
    """--evaluator all: one ROC panel per target with 16 curves that look different, legends beside them."""
    for targets in (["seen", "novel"], ["ArtPainting", "Cartoon", "Photo", "Sketch"]):
        results = _grid(SIXTEEN, targets)
        path = tmp_path / f"roc_{len(targets)}.png"
        plot_roc(results, str(path))
        figure = drawn[-1]
        assert [axes.get_title() for axes in figure.axes] == [f"PACS_DG/{target}" for target in targets]
        for axes in figure.axes:
            *curves, _ = axes.get_lines()
            looks = {(matplotlib.colors.to_hex(line.get_color()), line.get_linestyle()) for line in curves}
            assert len(looks) == len(curves) == 16
            assert [label.split("  AUROC")[0] for label in _legend_labels(axes)] == [*SIXTEEN, "chance"]
        contents = figure_contents(path)
        assert [panel["title"] for panel in contents["panels"]] == [f"PACS_DG/{target}" for target in targets]
        for panel, target in zip(contents["panels"], targets):
            expected = [f"{r.scorer}  AUROC {100 * r.metrics['auroc']:.2f}" for r in results if r.target == target]
            assert panel["legend"] == [*expected, "chance"]
        # Drawn again with the figure's layout: the legends sit beside their panels, inside the image.
        _, legends, _ = _check_nothing_covers_anything(figure)
        assert len(legends) == len(targets)
        image = figure.get_tightbbox(figure.canvas.get_renderer())
        for legend in legends:  # in inches: what bbox_inches="tight" keeps in the PNG
            assert legend.x1 / figure.dpi <= image.x1 + 1e-6 and legend.y0 / figure.dpi >= image.y0 - 1e-6
    hist = tmp_path / "hist.png"
    plot_score_histograms(_grid(SIXTEEN, ["ArtPainting", "Cartoon", "Photo", "Sketch"]), str(hist))
    assert len(drawn[-1].axes) == 64
    assert len(figure_contents(hist)["panels"]) == 64
    _, _, titles = _check_nothing_covers_anything(drawn[-1])
    width, height = drawn[-1].bbox.width, drawn[-1].bbox.height
    assert all(0 <= box.x0 and box.x1 <= width and 0 <= box.y0 and box.y1 <= height for box in titles)


def test_more_scorers_than_looks_are_split_over_panels(tmp_path, drawn):
    """29 and more curves used to raise; now a target's scorers fill several panels, same looks per scorer."""
    scorers = [f"scorer{i}" for i in range(40)]
    results = _grid(scorers, ["seen", "novel"], dataset="Digits")
    panels = roc_panels(results)
    assert [(title, len(curves)) for title, curves in panels] == [
        ("Digits/seen (1/2)", 28), ("Digits/seen (2/2)", 12), ("Digits/novel (1/2)", 28), ("Digits/novel (2/2)", 12)]
    assert [index for index, _ in panels[1][1]] == list(range(12))  # scorer28 looks like scorer0, in another panel
    path = tmp_path / "roc.png"
    plot_roc(results, str(path))
    contents = figure_contents(path)
    legend_names = [label.split("  AUROC")[0] for panel in contents["panels"] for label in panel["legend"]]
    assert legend_names == [*scorers[:28], "chance", *scorers[28:], "chance"] * 2
    figure = drawn[-1]
    assert len(figure.axes) == 4
    # A legend of 29 entries takes two columns, so that it stays about as tall as its panel.
    assert [axes.get_legend()._ncols for axes in figure.axes] == [2, 1, 2, 1]
    _check_nothing_covers_anything(figure)
    plot_score_histograms(results, str(tmp_path / "hist.png"))
    assert len(drawn[-1].axes) == 80


def test_result_figures_name_one_roc_and_one_histogram_figure_per_dataset(tmp_path):
    results = [_scored("seen", "resend", 1.0, 0), _scored("custom", "knn", 1.0, 1, dataset="Folder"),
               _scored("novel", "resend", 1.0, 2)]
    figures = result_figures(results)
    assert [name for name, _ in figures] == ["roc_Digits.png", "scores_Digits.png", "roc_Folder.png", "scores_Folder.png"]
    written = [draw(str(tmp_path / name)) for name, draw in figures]
    assert written == [str(tmp_path / name) for name, _ in figures]
    assert [panel["title"] for panel in figure_contents(tmp_path / "roc_Digits.png")["panels"]] == [
        "Digits/seen", "Digits/novel"]
    assert [panel["title"] for panel in figure_contents(tmp_path / "roc_Folder.png")["panels"]] == ["Folder/custom"]


def test_savefig_writes_png_whatever_the_rc_format(tmp_path):
    with matplotlib.rc_context({"savefig.format": "pdf"}):
        plot_roc([_result("seen", 2.0, 0)], str(tmp_path / "roc.png"))
        plot_score_histograms([_result("seen", 2.0, 0)], str(tmp_path / "hist.png"))
    assert figure_contents(tmp_path / "roc.png")["figure"] == "roc"
    assert figure_contents(tmp_path / "hist.png")["figure"] == "score_histograms"


def test_figure_style(tmp_path, drawn):
    """The look of the committed figures (media/): changing it should be a decision, not an accident.

    A matplotlibrc with other colours must not change it either.
    """
    results = [_scored("seen", "resend", 1.5, 0), _scored("novel", "resend", 0.4, 1)]
    with matplotlib.rc_context({"axes.prop_cycle": cycler(color=["black", "green", "orange"])}):
        plot_roc(results, str(tmp_path / "roc.png"))
        plot_score_histograms(results, str(tmp_path / "hist.png"))
    roc, hist = drawn
    for axes in roc.axes:
        curve, chance = axes.get_lines()
        assert (matplotlib.colors.to_hex(curve.get_color()), curve.get_linestyle(), curve.get_linewidth()) == (
            "#0072b2", "-", 1.6)
        assert (chance.get_linestyle(), chance.get_color(), chance.get_linewidth()) == ("--", "grey", 1)
        assert axes.xaxis.get_gridlines()[0].get_visible() and axes.xaxis.get_gridlines()[0].get_alpha() == 0.3
        legend = axes.get_legend()
        # Anchored at the axes' upper right corner, extending rightwards: outside the panel.
        assert legend._loc == 2 and tuple(legend.get_bbox_to_anchor().transformed(axes.transAxes.inverted()).p0) \
            == pytest.approx((1.03, 1.0))
        assert {text.get_fontsize() for text in legend.get_texts()} == {8}
    for panel in hist.axes:
        known, unknown = panel.patches
        assert known.get_facecolor() == pytest.approx(matplotlib.colors.to_rgba("#0072B2", 0.6))
        assert unknown.get_facecolor() == pytest.approx(matplotlib.colors.to_rgba("#D55E00", 0.6))
        assert panel.title.get_fontsize() == 9


def _write_eval_pair(eval_dir, stem: str, rows: list[tuple[int, float]], known_classes: int) -> None:
    eval_dir.mkdir(exist_ok=True)
    lines = ["path,label,known,normality,pred"]
    lines += [f"/d/img{i}.png,{label},{int(label < known_classes)},{score},0"
              for i, (label, score) in enumerate(rows)]
    (eval_dir / f"{stem}_scores.csv").write_text("\n".join(lines) + "\n")
    record = {"dataset": "Digits", "target": stem.split("_")[1], "scorer": "resend",
              "auroc": 0.75, "fpr95": 0.5, "known_classes": known_classes, "n_support": 9}
    (eval_dir / f"{stem}.json").write_text(json.dumps(record))


def test_read_eval_dir_reads_the_pairs_that_the_figures_draw(tmp_path, drawn):
    eval_dir = tmp_path / "eval"
    _write_eval_pair(eval_dir, "Digits_seen", [(0, 0.9), (4, 0.1), (1, 0.3), (5, 0.5)], 3)
    _write_eval_pair(eval_dir, "Digits_novel", [(0, 0.9), (1, 0.8), (3, 0.7), (4, 0.95), (2, 0.2)], 3)
    records = read_eval_dir(str(eval_dir))
    assert [r.target for r in records] == ["novel", "seen"]
    assert records[0].labels.tolist() == [0, 1, 3, 4, 2]
    assert records[0].normality.tolist() == [0.9, 0.8, 0.7, 0.95, 0.2]
    assert records[0].metrics == {"auroc": 0.75, "fpr95": 0.5}
    plot_roc(records, str(tmp_path / "media" / "roc.png"))
    (line, _chance) = drawn[0].axes[1].get_lines()
    # Digits/seen: known 0.9, 0.3; unknown 0.1, 0.5 -> operating points (0, .5), (.5, .5), (.5, 1), (1, 1).
    assert np.allclose(line.get_xdata(), [0, 0, 0.5, 0.5, 1]) and np.allclose(line.get_ydata(), [0, 0.5, 0.5, 1, 1])
    assert line.get_label() == "resend  AUROC 75.00" and drawn[0].axes[1].get_title() == "Digits/seen"


def test_read_eval_dir_errors(tmp_path):
    eval_dir = tmp_path / "eval"
    with pytest.raises(FileNotFoundError, match=rf"^evaluation folder not found: {re.escape(str(eval_dir))}$"):
        read_eval_dir(str(eval_dir))
    eval_dir.mkdir()
    with pytest.raises(FileNotFoundError, match=rf"^no \*_scores\.csv files in {re.escape(str(eval_dir))}$"):
        read_eval_dir(str(eval_dir))
    (eval_dir / "Digits_seen_scores.csv").write_text("path,label,known,normality,pred\n")
    with pytest.raises(FileNotFoundError, match=rf"^{re.escape(str(eval_dir / 'Digits_seen_scores.csv'))} has no "
                                                rf"matching {re.escape(str(eval_dir / 'Digits_seen.json'))}$"):
        read_eval_dir(str(eval_dir))
    _write_eval_pair(eval_dir, "Digits_seen", [(0, 0.5), (7, 0.1)], 5)
    csv_path = eval_dir / "Digits_seen_scores.csv"
    good_csv = csv_path.read_text()
    csv_path.write_text(good_csv.replace("/d/img1.png,7,0", "/d/img1.png,7,1"))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(csv_path))}, line 3: known=1 contradicts label 7 with 5 "
                                         "known classes$"):
        read_eval_dir(str(eval_dir))
    csv_path.write_text(good_csv.replace("/d/img1.png,7,0,0.1", "/d/img1.png,7,0,high"))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(csv_path))}, line 3: bad row \{{'path': '/d/img1\.png', "
                                         r"'label': '7', 'known': '0', 'normality': 'high', 'pred': '0'\}$"):
        read_eval_dir(str(eval_dir))
    csv_path.write_text(good_csv.replace("path,label,known,normality,pred", "path,label,known,score,pred"))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(csv_path))}: expected columns "
                                         r"path,label,known,normality,pred, got \['path', 'label', 'known', 'score', "
                                         r"'pred'\]$"):
        read_eval_dir(str(eval_dir))
    csv_path.write_text("path,label,known,normality,pred\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(csv_path))} has no rows$"):
        read_eval_dir(str(eval_dir))
    csv_path.write_text(good_csv)
    json_path = eval_dir / "Digits_seen.json"
    json_path.write_text(json.dumps({"dataset": "Digits", "target": "seen", "auroc": 0.5}))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(json_path))} lacks the keys \['scorer', 'known_classes'\]$"):
        read_eval_dir(str(eval_dir))


def test_read_eval_dir_reads_a_result_group(tmp_path):
    """A group also holds the manifest and the summary files; only the per-target pairs are results."""
    group = tmp_path / "eval" / "Digits_it300_0123abcd"
    group.mkdir(parents=True)
    _write_eval_pair(group, "Digits_seen", [(0, 0.9), (4, 0.1), (1, 0.7)], 3)
    _write_eval_pair(group, "Digits_novel", [(0, 0.2), (3, 0.6)], 3)
    (group / "Digits_summary.json").write_text(json.dumps({"auroc": []}))
    (group / "Digits_summary.csv").write_text("metric,method,seen,novel,average\n")
    (group / "manifest.json").write_text(json.dumps({"hash": "0123abcd"}))
    records = read_eval_dir(str(group))
    assert [(r.target, r.labels.tolist()) for r in records] == [("novel", [0, 3]), ("seen", [0, 4, 1])]


def test_read_eval_dir_fields_metrics_and_temp_files(tmp_path):
    eval_dir = tmp_path / "eval"
    _write_eval_pair(eval_dir, "Digits_seen", [(0, 0.9), (4, 0.1)], 3)
    record = json.loads((eval_dir / "Digits_seen.json").read_text())
    record.update(scorer="knn", aupr_in=0.6, aupr_out=0.7, closed_set_acc=0.8, n_known=1, settings={"k": 1})
    (eval_dir / "Digits_seen.json").write_text(json.dumps(record))
    # A writer's temp file next to the results is not a result.
    (eval_dir / ".tmp_host-1-abc_scores.csv").write_text("garbage")
    (records,) = read_eval_dir(str(eval_dir))
    assert (records.dataset, records.target, records.scorer, records.known_classes) == ("Digits", "seen", "knn", 3)
    assert records.metrics == {"auroc": 0.75, "fpr95": 0.5, "aupr_in": 0.6, "aupr_out": 0.7, "closed_set_acc": 0.8}
    assert records.labels.dtype == np.int64 and records.normality.dtype == np.float64


def test_eval_files_are_read_as_utf8_under_any_locale(tmp_path):
    """Paths and names may hold any character: the files are UTF-8 whatever the locale says."""
    eval_dir = tmp_path / "eval"
    _write_eval_pair(eval_dir, "Digits_seen", [(0, 0.9), (4, 0.1), (1, 0.3)], 3)
    csv_path = eval_dir / "Digits_seen_scores.csv"
    csv_path.write_text(csv_path.read_text().replace("/d/img0.png", "/d/über_çà.png"), encoding="utf-8")
    record = json.loads((eval_dir / "Digits_seen.json").read_text())
    record["target"] = "séen"
    (eval_dir / "Digits_seen.json").write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
    code = ("import sys, locale; from evaluation.plots import read_eval_dir; "
            "assert locale.getpreferredencoding(False) != 'UTF-8', locale.getpreferredencoding(False); "
            "(r,) = read_eval_dir(sys.argv[1]); print(r.target.encode('unicode_escape').decode(), r.labels.tolist())")
    env = dict(os.environ, LC_ALL="C", LANG="C", PYTHONCOERCECLOCALE="0", PYTHONUTF8="0",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run([sys.executable, "-c", code, str(eval_dir)], env=env, capture_output=True, text=True,
                          encoding="utf-8", timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["s\\xe9en", "[0,", "4,", "1]"]
    # The same read in this process (which also ties this test to read_eval_dir for mutation testing).
    (record,) = read_eval_dir(str(eval_dir))
    assert (record.target, record.labels.tolist()) == ("séen", [0, 4, 1])

