"""Evaluation figures: ROC and histogram PNGs from results and from an eval folder's files."""
import json
import os
from dataclasses import dataclass, field

import numpy as np
import pytest
from PIL import Image

from evaluation.plots import plot_roc, plot_score_histograms, plots_from_eval_dir, read_eval_dir


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
    assert roc.stat().st_size > 5000
    hist = tmp_path / "hist.png"
    plot_score_histograms(results, str(hist))
    width, height = _png_size(hist)
    assert width > height  # two panels side by side
    assert sorted(os.listdir(tmp_path)) == ["hist.png", "new"]  # no temporary files left


def test_plots_refuse_bad_results(tmp_path):
    one_sided = _result("seen", 1.0, 0)
    one_sided.labels = np.zeros_like(one_sided.labels)
    with pytest.raises(ValueError, match="Digits/seen: needs both known and unknown"):
        plot_roc([one_sided], str(tmp_path / "roc.png"))
    no_auroc = _result("novel", 1.0, 0)
    no_auroc.metrics = {}
    with pytest.raises(ValueError, match="no 'auroc'"):
        plot_roc([no_auroc], str(tmp_path / "roc.png"))
    with pytest.raises(ValueError, match="no results"):
        plot_score_histograms([], str(tmp_path / "hist.png"))
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
    eval_dir.mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*_scores.csv"):
        plots_from_eval_dir(str(eval_dir), str(tmp_path / "out"))
    (eval_dir / "Digits_seen_scores.csv").write_text("path,label,known,normality,pred\n")
    with pytest.raises(FileNotFoundError, match="Digits_seen.json"):
        plots_from_eval_dir(str(eval_dir), str(tmp_path / "out"))
    _write_eval_pair(eval_dir, "Digits_seen", [(0, 0.5), (7, 0.1)], 5)
    csv_path = eval_dir / "Digits_seen_scores.csv"
    csv_path.write_text(csv_path.read_text().replace("/d/img1.png,7,0", "/d/img1.png,7,1"))
    with pytest.raises(ValueError, match="line 3: known=1 contradicts label 7"):
        plots_from_eval_dir(str(eval_dir), str(tmp_path / "out"))
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
