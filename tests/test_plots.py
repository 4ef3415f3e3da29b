"""Evaluation figures: ROC and histogram PNGs from results and from an eval folder's files."""
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
from matplotlib.figure import Figure
from PIL import Image

from evaluation.plots import (
    plot_roc,
    plot_score_histograms,
    plots_from_eval_dir,
    read_eval_dir,
)


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


def _result(target: str, shift: float, seed: int) -> FakeResult:
    rng = np.random.default_rng(seed)
    labels = np.array([0, 1, 2] * 10 + [3, 4] * 10)
    normality = rng.normal(size=len(labels)) + shift * (labels < 3)
    return FakeResult("Digits", target, "resend", normality, labels, 3, {"auroc": 0.8})


def _png_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_plot_roc_and_histograms_write_pngs(tmp_path):
    results = [_result("seen", 2.0, 0), _result("novel", 0.5, 1)]
    roc = tmp_path / "new" / "roc.png"
    assert plot_roc(results, str(roc)) == str(roc)
    assert _png_size(roc) == (720, 660)  # 6 x 5.5 inches at 120 dpi
    hist = tmp_path / "hist.png"
    assert plot_score_histograms(results, str(hist)) == str(hist)
    assert _png_size(hist) == (1008, 408)  # two 4.2 x 3.4 inch panels side by side
    assert sorted(os.listdir(tmp_path)) == ["hist.png", "new"]  # no temporary files left


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


def _scored(target, scorer, shift, seed, n_known=40, n_unknown=25):
    """A result with tied scores (one decimal), AUROC in its metrics computed from the formula."""
    rng = np.random.default_rng(seed)
    labels = np.r_[rng.integers(0, 3, n_known), rng.integers(3, 6, n_unknown)]
    normality = np.round(rng.normal(size=len(labels)) + shift * (labels < 3), 1)
    result = FakeResult("Digits", target, scorer, normality, labels, 3)
    result.metrics = {"auroc": reference_auroc(normality, labels < 3)}
    return result


def _plotted_curves(figure):
    """The lines of the ROC axes except the chance diagonal, with the legend texts."""
    (axes,) = figure.axes
    labels = [text.get_text() for text in axes.get_legend().get_texts()]
    return axes, axes.get_lines(), labels


def test_roc_curves_are_the_results_roc_known_positive(tmp_path, drawn):
    results = [_scored("seen", "resend", 1.5, 0), _scored("novel", "knn", 0.4, 1), _scored("novel", "resend", -0.8, 2)]
    aurocs = [r.metrics["auroc"] for r in results]
    # Curves far from chance and from each other, so that swapping known and unknown (AUROC -> 1 - AUROC)
    # or mixing up the results shows.
    assert aurocs[0] > 0.8 and 0.55 < aurocs[1] < 0.75 and aurocs[2] < 0.35
    plot_roc(results, str(tmp_path / "roc.png"))
    (figure,) = drawn
    axes, lines, labels = _plotted_curves(figure)
    assert len(lines) == len(results) + 1
    for result, line in zip(results, lines):
        is_known = result.labels < result.known_classes
        fpr, tpr = line.get_xdata(), line.get_ydata()
        ref_fpr, ref_tpr = reference_roc(result.normality, is_known)
        # Every plotted point is an operating point of the result, from (0, 0) to (1, 1) ...
        assert (fpr[0], tpr[0]) == (0, 0) and (fpr[-1], tpr[-1]) == (1, 1)
        assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
        for x, y in zip(fpr, tpr):
            assert np.any(np.isclose(ref_fpr, x) & np.isclose(ref_tpr, y)), (x, y)
        # ... and the area under the plotted curve is the AUROC (points left out are collinear).
        assert np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2) == pytest.approx(reference_auroc(result.normality, is_known))
    chance = lines[-1]
    assert list(chance.get_xdata()) == [0, 1] and list(chance.get_ydata()) == [0, 1]
    assert chance.get_linestyle() == "--"
    # The legend names each curve (dataset/target and scorer) and its AUROC.
    assert labels == [f"Digits/seen resend  AUROC {100 * aurocs[0]:.2f}", f"Digits/novel knn  AUROC {100 * aurocs[1]:.2f}",
                      f"Digits/novel resend  AUROC {100 * aurocs[2]:.2f}", "chance"]
    assert [line.get_label() for line in lines] == labels
    assert axes.get_xlabel() == "false positive rate (unknown accepted as known)"
    assert axes.get_ylabel() == "true positive rate (known accepted)"
    assert axes.get_title() == "ROC, known = positive"
    assert axes.get_xlim() == (0, 1) and axes.get_ylim() == (0, 1.01)


def test_roc_legend_takes_the_auroc_from_the_metrics(tmp_path, drawn):
    result = _scored("seen", "prototype_cosine", 1.0, 3)
    result.metrics = {"auroc": 0.12345}
    plot_roc([result], str(tmp_path / "roc.png"))
    assert _plotted_curves(drawn[0])[2] == ["Digits/seen prototype_cosine  AUROC 12.35", "chance"]


def _bars(container):
    """(left edges + last right edge, heights) of a histogram's bars."""
    patches = list(container)
    edges = [p.get_x() for p in patches] + [patches[-1].get_x() + patches[-1].get_width()]
    return np.array(edges), np.array([p.get_height() for p in patches])


def test_histograms_are_the_known_and_unknown_densities(tmp_path, drawn):
    results = [_scored("seen", "resend", 1.5, 0), _scored("novel", "knn", 0.4, 1, n_known=30, n_unknown=50),
               _scored("a", "resend", 0.0, 2), _scored("b", "resend", 3.0, 4)]
    plot_score_histograms(results, str(tmp_path / "hist.png"))
    (figure,) = drawn
    assert len(figure.axes) == 4
    for index, (result, axes) in enumerate(zip(results, figure.axes)):
        assert axes.get_subplotspec().get_geometry() == (2, 3, index, index)  # 3 panels per row
        is_known = result.labels < result.known_classes
        normality = result.normality
        # 30 equal bins over the range of all scores, shared by both histograms.
        edges = np.linspace(normality.min(), normality.max(), 31)
        width = edges[1] - edges[0]
        known_bars, unknown_bars = axes.containers
        for bars, mask in ((known_bars, is_known), (unknown_bars, ~is_known)):
            plotted_edges, heights = _bars(bars)
            assert np.allclose(plotted_edges, edges)
            counts = [np.sum((normality[mask] >= lo) & ((normality[mask] < hi) | (hi == edges[-1])))
                      for lo, hi in itertools.pairwise(edges)]
            assert np.allclose(heights, np.array(counts) / (mask.sum() * width))
        labels = [text.get_text() for text in axes.get_legend().get_texts()]
        assert labels == [f"known ({is_known.sum()})", f"unknown ({(~is_known).sum()})"]
        name = f"Digits/{result.target} {result.scorer}"
        assert axes.get_title() == f"{name}  AUROC {100 * result.metrics['auroc']:.2f}"
        assert (axes.get_xlabel(), axes.get_ylabel()) == ("normality", "density")


def test_histogram_title_without_auroc(tmp_path, drawn):
    result = _scored("seen", "resend", 1.0, 5)
    result.metrics = {}
    plot_score_histograms([result], str(tmp_path / "hist.png"))
    assert drawn[0].axes[0].get_title() == "Digits/seen resend"
    assert _png_size(tmp_path / "hist.png") == (504, 408)


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
        plot_roc([no_auroc], str(tmp_path / "roc.png"))
    with pytest.raises(ValueError, match="^no results to plot$"):
        plot_score_histograms([], str(tmp_path / "hist.png"))
    with pytest.raises(ValueError, match="^no results to plot$"):
        plot_roc([], str(tmp_path / "roc.png"))
    assert not os.listdir(tmp_path)


def _write_eval_pair(eval_dir, stem: str, rows: list[tuple[int, float]], known_classes: int) -> None:
    eval_dir.mkdir(exist_ok=True)
    lines = ["path,label,known,normality,pred"]
    lines += [f"/d/img{i}.png,{label},{int(label < known_classes)},{score},0"
              for i, (label, score) in enumerate(rows)]
    (eval_dir / f"{stem}_scores.csv").write_text("\n".join(lines) + "\n")
    record = {"dataset": "Digits", "target": stem.split("_")[1], "scorer": "resend",
              "auroc": 0.75, "fpr95": 0.5, "known_classes": known_classes, "n_support": 9}
    (eval_dir / f"{stem}.json").write_text(json.dumps(record))


def test_plots_from_eval_dir(tmp_path):
    eval_dir = tmp_path / "eval"
    _write_eval_pair(eval_dir, "Digits_novel", [(0, 0.9), (1, 0.8), (3, 0.7), (4, 0.95), (2, 0.2)], 3)
    records = read_eval_dir(str(eval_dir))
    assert len(records) == 1
    assert records[0].labels.tolist() == [0, 1, 3, 4, 2]
    assert records[0].normality.tolist() == [0.9, 0.8, 0.7, 0.95, 0.2]
    assert records[0].metrics == {"auroc": 0.75, "fpr95": 0.5}
    written = plots_from_eval_dir(str(eval_dir), str(tmp_path / "media"))
    assert written == [str(tmp_path / "media" / "roc_Digits.png"),
                       str(tmp_path / "media" / "scores_Digits.png")]
    assert all(os.path.getsize(path) > 1000 for path in written)


def test_plots_from_eval_dir_errors(tmp_path):
    eval_dir = tmp_path / "eval"
    with pytest.raises(FileNotFoundError, match=rf"^evaluation folder not found: {re.escape(str(eval_dir))}$"):
        plots_from_eval_dir(str(eval_dir), str(tmp_path / "out"))
    eval_dir.mkdir()
    with pytest.raises(FileNotFoundError, match=rf"^no \*_scores\.csv files in {re.escape(str(eval_dir))}$"):
        plots_from_eval_dir(str(eval_dir), str(tmp_path / "out"))
    (eval_dir / "Digits_seen_scores.csv").write_text("path,label,known,normality,pred\n")
    with pytest.raises(FileNotFoundError, match=rf"^{re.escape(str(eval_dir / 'Digits_seen_scores.csv'))} has no "
                                                rf"matching {re.escape(str(eval_dir / 'Digits_seen.json'))}$"):
        plots_from_eval_dir(str(eval_dir), str(tmp_path / "out"))
    _write_eval_pair(eval_dir, "Digits_seen", [(0, 0.5), (7, 0.1)], 5)
    csv_path = eval_dir / "Digits_seen_scores.csv"
    good_csv = csv_path.read_text()
    csv_path.write_text(good_csv.replace("/d/img1.png,7,0", "/d/img1.png,7,1"))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(csv_path))}, line 3: known=1 contradicts label 7 with 5 "
                                         "known classes$"):
        plots_from_eval_dir(str(eval_dir), str(tmp_path / "out"))
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
    assert not (tmp_path / "out").exists()


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


def test_plots_from_eval_dir_draws_each_dataset_from_its_files(tmp_path, drawn):
    eval_dir = tmp_path / "eval"
    _write_eval_pair(eval_dir, "Digits_seen", [(0, 0.9), (4, 0.1), (1, 0.3), (5, 0.5)], 3)
    _write_eval_pair(eval_dir, "PACS_novel", [(0, 0.2), (3, 0.6), (2, 0.9)], 3)
    record = json.loads((eval_dir / "PACS_novel.json").read_text())
    (eval_dir / "PACS_novel.json").write_text(json.dumps(dict(record, dataset="PACS", auroc=0.5)))
    written = plots_from_eval_dir(str(eval_dir), str(tmp_path / "media"))
    assert written == [str(tmp_path / "media" / name) for name in
                       ("roc_Digits.png", "scores_Digits.png", "roc_PACS.png", "scores_PACS.png")]
    roc_digits, hist_digits, roc_pacs, _ = drawn
    (line, _chance) = roc_digits.axes[0].get_lines()
    # Digits/seen: known 0.9, 0.3; unknown 0.1, 0.5 -> operating points (0, .5), (.5, .5), (.5, 1), (1, 1).
    assert np.allclose(line.get_xdata(), [0, 0, 0.5, 0.5, 1]) and np.allclose(line.get_ydata(), [0, 0.5, 0.5, 1, 1])
    assert line.get_label() == "Digits/seen resend  AUROC 75.00"
    assert roc_pacs.axes[0].get_lines()[0].get_label() == "PACS/novel resend  AUROC 50.00"
    assert hist_digits.axes[0].get_title() == "Digits/seen resend  AUROC 75.00"


def test_savefig_writes_png_whatever_the_rc_format(tmp_path):
    with matplotlib.rc_context({"savefig.format": "pdf"}):
        plot_roc([_result("seen", 2.0, 0)], str(tmp_path / "roc.png"))
    assert _png_size(tmp_path / "roc.png") == (720, 660)


def test_figure_style(tmp_path, drawn):
    """The look of the committed figures (media/): changing it should be a decision, not an accident.

    A matplotlibrc with other colours must not change it either.
    """
    results = [_scored("seen", "resend", 1.5, 0), _scored("novel", "resend", 0.4, 1)]
    with matplotlib.rc_context({"axes.prop_cycle": cycler(color=["black", "green", "orange"])}):
        plot_roc(results, str(tmp_path / "roc.png"))
        plot_score_histograms(results * 2, str(tmp_path / "hist.png"))
    assert _png_size(tmp_path / "hist.png") == (1512, 816)  # 3 panels of 4.2 x 3.4 inches per row, 2 rows
    roc, hist = drawn
    (axes,) = roc.axes
    assert axes.get_subplotspec().get_geometry() == (1, 1, 0, 0)
    *curves, chance = axes.get_lines()
    assert [line.get_linewidth() for line in curves] == [1.6, 1.6]
    assert (chance.get_linestyle(), chance.get_color(), chance.get_linewidth()) == ("--", "grey", 1)
    assert axes.xaxis.get_gridlines()[0].get_visible() and axes.xaxis.get_gridlines()[0].get_alpha() == 0.3
    legend = axes.get_legend()
    assert legend._loc == 4 and {text.get_fontsize() for text in legend.get_texts()} == {8}  # 4: lower right
    for panel in hist.axes:
        known_bars, unknown_bars = panel.containers
        assert {bar.get_alpha() for bar in (*known_bars, *unknown_bars)} == {0.6}
        assert known_bars[0].get_facecolor() == pytest.approx(matplotlib.colors.to_rgba("#0072B2", 0.6))
        assert unknown_bars[0].get_facecolor() == pytest.approx(matplotlib.colors.to_rgba("#D55E00", 0.6))
        assert panel.title.get_fontsize() == 9
        assert {text.get_fontsize() for text in panel.get_legend().get_texts()} == {8}


def test_every_curve_has_its_own_colour_and_style(tmp_path, drawn):
    """14 curves (--evaluator all on two targets) with no repeated look, from a colour-blind-safe palette."""
    results = [_scored(target, f"scorer{i}", 0.2 * i, i) for i in range(7) for target in ("seen", "novel")]
    plot_roc(results, str(tmp_path / "roc.png"))
    *curves, _ = drawn[0].axes[0].get_lines()
    looks = [(matplotlib.colors.to_hex(line.get_color()), line.get_linestyle()) for line in curves]
    assert len(set(looks)) == len(results) == 14
    okabe_ito = {"#0072b2", "#e69f00", "#009e73", "#d55e00", "#cc79a7", "#56b4e9", "#f0e442"}
    assert {colour for colour, _ in looks} <= okabe_ito
    assert [line.get_label().split("  AUROC")[0] for line in curves] == [
        f"Digits/{r.target} {r.scorer}" for r in results]
    with pytest.raises(ValueError, match="at most 28 curves can be told apart in one figure; got a 29th"):
        plot_roc([_scored("seen", f"s{i}", 0.5, i) for i in range(29)], str(tmp_path / "many.png"))
