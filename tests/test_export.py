"""`train.py --export`: one .pt2 file that scores images like the repository, read without the repository."""
import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train
from datasets.benchmarks import get_eval_split
from evaluation import export as export_module
from evaluation.api import NoveltyDetector
from evaluation.export import ExportError, load_exported, pixels_of
from tests.conftest import save_informative_checkpoint
from tests.imagegen import make_image_tree

REPO = Path(__file__).resolve().parents[1]
KNOWN = ["ant", "bee", "cat"]
IMAGE_SIZE = 32

# Run in a fresh interpreter with -I (no PYTHONPATH, no script folder or cwd on sys.path), from a
# temp folder: only torch and Pillow, the preprocessing read from the file's metadata. The images go
# in one batch, as the repository scores them: with this refitted head, scoring an image alone or in
# a batch moves its logit by ~1e-5 in the repository itself (float rounding of the convolutions).
CONSUMER = textwrap.dedent("""
    import importlib.util, json, sys
    import torch
    from PIL import Image
    assert importlib.util.find_spec("evaluation") is None and importlib.util.find_spec("models") is None
    meta = {"resend_detector.json": ""}
    detector = torch.export.load(sys.argv[1], extra_files=meta).module()
    info = json.loads(meta["resend_detector.json"])
    size = info["preprocessing"]["image_size"]
    assert info["preprocessing"]["resize"]["interpolation"] == "bilinear"
    batch = []
    for path in sys.argv[2:]:
        image = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
        batch.append(torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3))
    out = detector(torch.stack(batch))
    rows = [{"path": path, **{key: value[i].item() for key, value in out.items()}}
            for i, path in enumerate(sys.argv[2:])]
    try:
        detector(torch.zeros(1, size + 8, size + 8, 3, dtype=torch.uint8))
        wrong_size = "accepted"
    except Exception as error:
        wrong_size = str(error)
    print(json.dumps({"rows": rows, "wrong_size": wrong_size, "class_names": info["class_names"]}))
""")


def export_argv(out, ckpt, source, *extra):
    """train.py arguments that export `ckpt` with the Folder support set `source`."""
    return ["--export", str(out), "--dataset", "Folder", "--source_dir", str(source),
            "--checkpoint_folder_path", str(ckpt), "--device", "cpu", "--num_workers", "0", *extra]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A Folder tree, a checkpoint whose args.json says 32 px, and its export written by a train.py process."""
    root = tmp_path_factory.mktemp("export")
    make_image_tree(root / "src", {name: 3 for name in KNOWN}, size=40, seed=1)
    make_image_tree(root / "tgt", {name: 2 for name in KNOWN + ["dog", "eel"]}, size=40, seed=2)
    split = get_eval_split("Folder", None, None, source_dir=str(root / "src"), target_dir=str(root / "tgt"))
    ckpt = save_informative_checkpoint(root / "ckpt", split.support, IMAGE_SIZE)
    (ckpt / "args.json").write_text(json.dumps({"image_size": IMAGE_SIZE, "transf_n_heads": 12}))
    (root / "out").mkdir()
    out = root / "out" / "detector.pt2"
    done = subprocess.run([sys.executable, str(REPO / "train.py"), *export_argv(out, ckpt, root / "src")],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "same nearest class" in done.stdout
    return {"root": root, "ckpt": ckpt, "file": out, "split": split, "stdout": done.stdout}


def test_exported_file_scores_like_only_eval_without_the_repository(exported, tmp_path):
    root, ckpt = exported["root"], exported["ckpt"]
    assert train.run_command_line(["--only_eval", "--dataset", "Folder", "--source_dir", str(root / "src"),
                                   "--target_dir", str(root / "tgt"), "--checkpoint_folder_path", str(ckpt),
                                   "--device", "cpu", "--num_workers", "0"]) == 0
    (csv_path,) = (ckpt / "eval").glob("*/*_resend_scores.csv")
    rows = list(csv.DictReader(csv_path.open()))
    paths = [row["path"] for row in rows]

    script = tmp_path / "consumer.py"
    script.write_text(CONSUMER)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-I", str(script), str(exported["file"]), *paths], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    got = result["rows"]
    assert [row["path"] for row in got] == paths and result["class_names"] == KNOWN

    normality = np.array([float(row["normality"]) for row in rows])
    # The comparison must be informative: scores spread, several classes predicted.
    assert np.ptp(normality) > 0.1 and len({row["pred"] for row in rows}) >= 2
    np.testing.assert_allclose([row["normality"] for row in got], normality, rtol=0, atol=1e-5)
    np.testing.assert_allclose([row["novelty"] for row in got], 1 - normality, rtol=0, atol=1e-5)
    assert [row["nearest_class"] for row in got] == [int(row["pred"]) for row in rows]
    # The per-pair score of the nearest class: the API's max_logit of the same checkpoint.
    api = NoveltyDetector.from_folder(str(ckpt), verbose=False)
    api.fit([path for path, _ in exported["split"].support], [label for _, label in exported["split"].support])
    expected = api.score(paths)
    np.testing.assert_allclose([row["similarity"] for row in got], expected.extra["max_logit"].numpy(),
                               rtol=0, atol=1e-5)
    # The exported program's own shape check names the size it expects.
    assert f"== {IMAGE_SIZE}" in result["wrong_size"]


def test_metadata_records_preprocessing_classes_and_provenance(exported):
    meta = load_exported(str(exported["file"])).metadata
    assert meta["class_names"] == KNOWN and meta["support_images_per_class"] == {name: 3 for name in KNOWN}
    pre = meta["preprocessing"]
    assert pre["image_size"] == IMAGE_SIZE and pre["input"]["shape"] == ["N", IMAGE_SIZE, IMAGE_SIZE, 3]
    assert pre["mean"] == [0.485, 0.456, 0.406] and pre["std"] == [0.229, 0.224, 0.225]
    prov = meta["provenance"]
    assert prov["checkpoint"] == str(exported["ckpt"]) and prov["iteration"] == 7
    assert prov["run_args"] == str(exported["ckpt"] / "args.json") and prov["backbone_checkpoint"] is None
    assert prov["dataset"] == "Folder" and prov["source_dir"] == str(exported["root"] / "src")
    assert meta["model"]["objective"] == "L2" and meta["scorer"] == "resend"


def test_project_reader_refuses_pixels_of_another_size_and_resizes_images(exported):
    detector = load_exported(str(exported["file"]))
    with pytest.raises(ExportError, match=rf"expects uint8 RGB pixels of shape \[N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3\].*"
                                          r"got torch.uint8 \(1, 40, 40, 3\)"):
        detector.score_pixels(torch.zeros(1, 40, 40, 3, dtype=torch.uint8))
    with pytest.raises(ExportError, match=r"got torch.float32"):
        detector.score_pixels(torch.zeros(1, IMAGE_SIZE, IMAGE_SIZE, 3))
    # Images (paths or PIL) are resized as the metadata says, whatever their size.
    image = Image.open(exported["split"].support[0][0]).convert("RGB")
    assert image.size == (40, 40)
    by_image = detector.score([image])
    by_pixels = detector.score_pixels(pixels_of(image, IMAGE_SIZE).unsqueeze(0))
    assert torch.equal(by_image["normality"], by_pixels["normality"])


def test_project_reader_names_a_damaged_or_foreign_file(exported, tmp_path):
    data = exported["file"].read_bytes()
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(data[:len(data) // 2])
    with pytest.raises(ExportError, match=rf"cannot read exported detector {truncated}: not a complete .pt2 archive"):
        load_exported(str(truncated))
    foreign = tmp_path / "foreign.pt2"
    torch.export.save(torch.export.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),)), str(foreign))
    with pytest.raises(ExportError, match=rf"{foreign} is a .pt2 program but not a ReSeND exported detector"):
        load_exported(str(foreign))
    with pytest.raises(FileNotFoundError, match="exported detector not found: .*absent.pt2"):
        load_exported(str(tmp_path / "absent.pt2"))


@pytest.mark.parametrize("extra, message", [
    (["--target", "all"], "--export takes the support set of one target; --target all names several"),
    (["--dataset", "PACS_DG"], "--target is not given (choose one of ArtPainting, Cartoon, Photo, Sketch;"),
    (["--evaluator", "resend_knn"], "--export builds the default resend scorer (class prototypes); got resend_knn"),
    (["--most_significant_prototypes"], "got resend_msp"),
    (["--amp", "bf16"], "--export writes a float32 program"),
    (["--only_eval"], "it does not combine with --only_eval"),
], ids=["target_all", "no_target", "evaluator", "msp", "amp", "only_eval"])
def test_export_refuses_what_it_cannot_honour(exported, tmp_path, capsys, extra, message):
    out = tmp_path / "detector.pt2"
    argv = export_argv(out, exported["ckpt"], exported["root"] / "src", *extra)
    assert train.run_command_line(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()


def test_export_refuses_a_missing_folder_and_an_existing_file(exported, tmp_path, capsys):
    missing = tmp_path / "no_such_folder" / "detector.pt2"
    assert train.run_command_line(export_argv(missing, exported["ckpt"], exported["root"] / "src")) == 2
    assert capsys.readouterr().err.strip() == (f"error: --export {missing}: folder {missing.parent} "
                                               "does not exist")
    existing = tmp_path / "mine.pt2"
    existing.write_text("the user's file")
    assert train.run_command_line(export_argv(existing, exported["ckpt"], exported["root"] / "src")) != 0
    assert "already exists" in capsys.readouterr().err and existing.read_text() == "the user's file"


def test_a_failed_check_leaves_no_file(exported, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(export_module, "CHECK_TOLERANCE", -1.0)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "detector.pt2"
    assert train.run_command_line(export_argv(out, exported["ckpt"], exported["root"] / "src")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{out} does not reproduce the in-repository resend scores" in err[0]
    assert "nothing was written" in err[0] and os.listdir(out_dir) == []


def test_backbone_checkpoint_is_exported_and_recorded(exported, tmp_path):
    from models.backbone import ResNetBackbone

    torch.manual_seed(5)
    backbone_path = tmp_path / "fine_tuned.pth"
    torch.save(ResNetBackbone("resnet18", weights=None).state_dict(), backbone_path)
    out = tmp_path / "detector.pt2"
    argv = export_argv(out, exported["ckpt"], exported["root"] / "src", "--backbone_checkpoint", str(backbone_path))
    # The export's own check compares it with the API loaded with the same backbone file.
    assert train.run_command_line(argv) == 0
    detector, original = load_exported(str(out)), load_exported(str(exported["file"]))
    provenance = detector.metadata["provenance"]
    assert os.path.abspath(provenance["backbone_checkpoint"]) == str(backbone_path)
    assert len(provenance["backbone_sha256"]) == 64
    image = [exported["split"].support[0][0]]
    assert not torch.equal(detector.score(image)["similarity"], original.score(image)["similarity"])


def test_a_ce_head_exports_its_same_class_logit(exported, tmp_path):
    ckpt = save_informative_checkpoint(tmp_path / "ce_ckpt", exported["split"].support, IMAGE_SIZE, n_outputs=2)
    out = tmp_path / "detector.pt2"
    # The export's own check compares the program with the API's resend scores of this CE checkpoint.
    assert train.run_command_line(export_argv(out, ckpt, exported["root"] / "src", "--image_size", "32")) == 0
    detector = load_exported(str(out))
    assert detector.metadata["model"]["objective"] == "CE"
    assert detector.metadata["provenance"]["overrides"] == {} and detector.metadata["provenance"]["run_args"] is None
