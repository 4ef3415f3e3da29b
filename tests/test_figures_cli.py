"""The evaluation figures through the command line: every scorer on 2 and on 4 targets, and figures that fail.

`--evaluator all` used to end a run with `error: at most 28 curves can be told apart in one figure`
after every result was written. Each result group now holds `roc_<dataset>.png` (one panel per
target, one curve per scorer) and `scores_<dataset>.png`; what they show is read back from the PNGs'
text metadata, as a user's script could.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import train
from datasets.benchmarks import get_eval_split
from evaluation import plots
from evaluation.plots import FIGURE_CONTENTS_KEY
from evaluation.scorers import SCORERS
from tests.conftest import save_informative_checkpoint
from training.demo import copy_group_figures

REPO = Path(__file__).resolve().parents[1]
PACS_CLASSES = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
PACS_DOMAINS = ["art_painting", "cartoon", "photo", "sketch"]
PACS_TARGETS = ["ArtPainting", "Cartoon", "Photo", "Sketch"]
DIGITS_FOLDERS = {"train": range(5), "heldout": range(5), "novel_support": (5, 6, 7), "novel_query": range(5, 10)}


def figure_contents(path) -> dict:
    """What a figure shows (title, panels with their titles and legend entries), from its PNG metadata."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        return json.loads(image.text[FIGURE_CONTENTS_KEY])


def tiny_digits(image_tree, root: Path) -> Path:
    """A Digits tree of 2 tiny images per folder (2 targets, seen and novel) with the manifest it needs."""
    image_tree({f"Digits/{split}/{digit}": 2 for split, digits in DIGITS_FOLDERS.items() for digit in digits},
               root=root, size=20)
    (root / "Digits" / "manifest.json").write_text(json.dumps({"format": "resend-digits", "version": 1}))
    return root


def tiny_pacs(image_tree, root: Path) -> Path:
    """Every PACS domain/class folder with 2 tiny images (4 targets)."""
    return image_tree({f"PACS/kfold/{d}/{c}": 2 for d in PACS_DOMAINS for c in PACS_CLASSES}, root=root, size=20)


def train_py(*argv: str) -> subprocess.CompletedProcess:
    """`python train.py ARGV` in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, str(REPO / "train.py"), *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=900, check=False)


def only_eval_argv(dataset: str, root: Path, checkpoint: Path, *extra: str) -> list:
    return ["--only_eval", "--dataset", dataset, "--target", "all", "--data_root", str(root),
            "--checkpoint_folder_path", str(checkpoint), "--image_size", "32", "--num_workers", "0",
            "--device", "cpu", *extra]


def only_group(checkpoint: Path) -> Path:
    (group,) = [path for path in (checkpoint / "eval").iterdir() if (path / "manifest.json").is_file()]
    assert sorted(os.listdir(checkpoint / "eval")) == [group.name]
    return group


def check_figures(group: Path, dataset: str, targets: list) -> None:
    """The group lists its two figures; every scorer's curve is in each target's panel, labelled with its AUROC."""
    manifest = json.loads((group / "manifest.json").read_text())
    assert sorted(manifest["files"] + ["manifest.json"]) == sorted(os.listdir(group))
    assert {f"roc_{dataset}.png", f"scores_{dataset}.png"} <= set(manifest["files"])
    scorers = manifest["scorers"]
    assert sorted(scorers) == sorted(SCORERS) and len(scorers) == 16  # --evaluator all
    auroc = {(target, scorer): json.loads((group / f"{dataset}_{target}_{scorer}.json").read_text())["auroc"]
             for target in targets for scorer in scorers}
    roc = figure_contents(group / f"roc_{dataset}.png")
    assert roc["title"] == f"{dataset}: ROC per target, known = positive"
    assert [panel["title"] for panel in roc["panels"]] == [f"{dataset}/{target}" for target in targets]
    for panel, target in zip(roc["panels"], targets):
        assert panel["legend"] == [f"{scorer}  AUROC {100 * auroc[target, scorer]:.2f}" for scorer in scorers] + ["chance"]
    histograms = figure_contents(group / f"scores_{dataset}.png")
    assert sorted(panel["title"] for panel in histograms["panels"]) == sorted(
        f"{dataset}/{target} {scorer}  AUROC {100 * auroc[target, scorer]:.2f}" for target in targets for scorer in scorers)


def test_evaluator_all_on_two_targets_exits_0_with_its_figures(image_tree, tmp_path):
    root = tiny_digits(image_tree, tmp_path / "data")
    checkpoint = save_informative_checkpoint(tmp_path / "ckpt", get_eval_split("Digits", "seen", str(root)).support, 32)
    done = train_py(*only_eval_argv("Digits", root, checkpoint, "--evaluator", "all"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warning" not in done.stdout + done.stderr
    check_figures(only_group(checkpoint), "Digits", ["seen", "novel"])


def test_evaluator_all_on_four_targets_exits_0_with_its_figures(image_tree, tmp_path):
    root = tiny_pacs(image_tree, tmp_path / "data")
    support = get_eval_split("PACS_DG", "ArtPainting", str(root)).support
    checkpoint = save_informative_checkpoint(tmp_path / "ckpt", support, 32)
    done = train_py(*only_eval_argv("PACS_DG", root, checkpoint, "--evaluator", "all"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warning" not in done.stdout + done.stderr
    check_figures(only_group(checkpoint), "PACS_DG", PACS_TARGETS)


def test_a_figure_that_cannot_be_drawn_is_one_warning_and_the_results_stay(image_tree, tmp_path, monkeypatch,
                                                                           capsys):
    root = tiny_pacs(image_tree, tmp_path / "data")
    checkpoint = save_informative_checkpoint(tmp_path / "ckpt", get_eval_split("PACS_DG", "Photo", str(root)).support, 32)

    def broken(results, path):
        raise RuntimeError("the renderer broke\non two lines")

    monkeypatch.setattr(plots, "plot_roc", broken)
    argv = only_eval_argv("PACS_DG", root, checkpoint, "--target", "Photo", "--evaluator", "resend,prototype_map",
                          "--save_maps", "1")
    assert train.run_command_line(argv) == 0
    group = only_group(checkpoint)
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if "warning" in line]
    assert warnings == [f"warning: figure {group}/roc_PACS_DG.png not drawn: RuntimeError: the renderer broke on two lines"]
    # Every result file is in place, the other figures too; the manifest lists exactly what is there.
    manifest = json.loads((group / "manifest.json").read_text())
    assert sorted(manifest["files"]) == sorted(
        [f"PACS_DG_Photo_{scorer}{suffix}" for scorer in ("resend", "prototype_map") for suffix in (".json", "_scores.csv")]
        + ["PACS_DG_summary.csv", "PACS_DG_summary.json", "scores_PACS_DG.png", "maps_PACS_DG_Photo.png"])
    assert sorted(manifest["files"] + ["manifest.json"]) == sorted(os.listdir(group))
    assert f"results written to {group}" in out

    # A map figure whose image vanished (an OSError in the middle of drawing) is one more warning, no temp file.
    monkeypatch.undo()

    def vanished(path, side):
        raise OSError(2, "gone", path)

    monkeypatch.setattr("evaluation.map_figures._panel", vanished)
    assert train.run_command_line([*argv, "--tag", "again"]) == 0
    again = checkpoint / "eval" / "again"
    (warning,) = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert re.fullmatch(rf"warning: figure {re.escape(str(again))}/maps_PACS_DG_Photo\.png not drawn: FileNotFoundError: "
                        rf"\[Errno 2\] gone: '{re.escape(str(root))}/PACS/kfold/photo/\w+/img_\d+\.jpg'", warning), warning
    files = json.loads((again / "manifest.json").read_text())["files"]
    assert "maps_PACS_DG_Photo.png" not in files and {"roc_PACS_DG.png", "scores_PACS_DG.png"} <= set(files)
    assert sorted(files + ["manifest.json"]) == sorted(os.listdir(again))


def test_demo_figures_are_copied_from_the_group_and_a_missing_one_is_a_warning(tmp_path, capsys):
    group = tmp_path / "eval" / "Digits_it300_0123abcd"
    group.mkdir(parents=True)
    (group / "scores_Digits.png").write_bytes(b"histograms")
    figures = tmp_path / "figures"
    assert copy_group_figures(str(group), str(figures), "Digits") == [str(figures / "score_histograms.png")]
    assert (figures / "score_histograms.png").read_bytes() == b"histograms"
    assert os.listdir(figures) == ["score_histograms.png"]
    assert capsys.readouterr().out == (f"warning: {figures}/roc.png not written: No such file or directory "
                                       f"({group}/roc_Digits.png)\n")
