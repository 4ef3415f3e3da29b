"""Tests for evaluation.api.NoveltyDetector, the plug-and-play Python API."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from evaluation.api import NoveltyDetector
from models.checkpoint import load_model_folder
from tests.authors_reference import reference_features, reference_resend
from tests.conftest import save_informative_checkpoint
from utils.run_args import RunArgsError

IMAGE_SIZE = 32


@pytest.fixture
def images(image_tree, tmp_path):
    """(support paths, support labels, query paths): three known classes, queries from them and a novel one."""
    root = image_tree({"a": 4, "b": 4, "c": 4, "novel": 3}, root=tmp_path / "img", size=20)
    support = [str(root / c / f"img_{i:03d}.jpg") for c in ("a", "b", "c") for i in range(2)]
    queries = [str(root / c / f"img_{i:03d}.jpg") for c in ("a", "b", "c") for i in (2, 3)]
    queries += [str(root / "novel" / f"img_{i:03d}.jpg") for i in range(3)]
    return support, [0, 0, 1, 1, 2, 2], queries


@pytest.fixture(params=[1, 2], ids=["L2_head", "CE_head"])
def checkpoint(request, images, tmp_path):
    """A checkpoint whose head is refitted on the support pairs, so scores and predictions vary."""
    support, labels, _ = images
    return save_informative_checkpoint(tmp_path / "ckpt", list(zip(support, labels)), IMAGE_SIZE,
                                       n_outputs=request.param)


def test_detector_gives_the_authors_scores(checkpoint, images):
    support, labels, queries = images
    detector = NoveltyDetector.from_folder(str(checkpoint), image_size=IMAGE_SIZE, batch_size=3)
    result = detector.fit(support, labels).score(queries)
    model = load_model_folder(str(checkpoint))
    normality, preds = reference_resend(model.relational, reference_features(model.backbone, support, IMAGE_SIZE),
                                        labels, reference_features(model.backbone, queries, IMAGE_SIZE), 3)
    assert np.ptp(normality) > 0.1 and len(set(preds.tolist())) >= 2
    np.testing.assert_allclose(result.normality.numpy(), normality, rtol=0, atol=1e-4 * np.abs(normality).max())
    assert np.array_equal(result.pred.numpy(), preds)
    # The loaded model is left as loaded (its BatchNorms are not folded away).
    assert any(isinstance(m, nn.BatchNorm2d) for m in detector.model.backbone.modules())


def test_detector_accepts_features(checkpoint, images):
    support, labels, queries = images
    detector = NoveltyDetector.from_folder(str(checkpoint), image_size=IMAGE_SIZE)
    from_images = detector.fit(support, labels).score(queries)
    from_feats = detector.fit(detector.features(support), labels).score(detector.features(queries))
    assert np.ptp(from_images.normality.numpy()) > 0.1
    assert torch.allclose(from_images.normality, from_feats.normality, atol=1e-6)


def test_detector_bad_use(checkpoint, images):
    support, labels, queries = images
    detector = NoveltyDetector.from_folder(str(checkpoint), image_size=IMAGE_SIZE)
    with pytest.raises(RuntimeError, match="fit"):
        detector.score(queries)
    with pytest.raises(ValueError, match="6 support samples but 3 labels"):
        detector.fit(support, labels[:3])
    with pytest.raises(ValueError, match=r"\[N, 512\]"):
        detector.fit(torch.zeros(6, 16), labels)
    with pytest.raises(ValueError, match="no images"):
        detector.features([])


def test_from_folder_takes_the_run_settings_from_args_json(checkpoint, capsys):
    """The authors' folder (no args.json) keeps 224 px and 12 heads; a run folder's args.json decides both."""
    detector = NoveltyDetector.from_folder(str(checkpoint))
    assert capsys.readouterr().out == (f"no args.json in {checkpoint}: using image_size=224, n_heads=12\n"
                                       f"loaded iteration 7 from {checkpoint}\n")
    assert (detector.settings["image_size"], detector.settings["n_heads"], detector.settings["run_args"]) == \
        (224, 12, None)
    assert detector.settings["iteration"] == 7 and detector.settings["depth"] == 2

    (checkpoint / "args.json").write_text(json.dumps({"image_size": IMAGE_SIZE, "transf_n_heads": 6}))
    detector = NoveltyDetector.from_folder(str(checkpoint))
    assert capsys.readouterr().out.splitlines()[0] == \
        f"settings of the run from {checkpoint}/args.json: image_size {IMAGE_SIZE}, transf_n_heads 6"
    assert detector.image_size == IMAGE_SIZE and detector.model.relational.blocks[0].attn.num_heads == 6
    assert detector.settings["n_heads"] == 6 and detector.settings["overrides"] == {}

    detector = NoveltyDetector.from_folder(str(checkpoint), n_heads=12, verbose=False)
    assert capsys.readouterr().out == ""
    assert detector.model.relational.blocks[0].attn.num_heads == 12
    assert detector.settings["overrides"] == {"transf_n_heads": {"run": 6, "given": 12}}

    (checkpoint / "args.json").write_text("{")
    with pytest.raises(RunArgsError, match=f"cannot read the run's settings {checkpoint}/args.json"):
        NoveltyDetector.from_folder(str(checkpoint))


def test_the_readme_snippet_runs_as_written(tmp_path, monkeypatch):
    """The README's Python API snippet, run from another folder with the repository on PYTHONPATH."""
    from tests.imagegen import make_image_tree

    root = Path(__file__).resolve().parents[1]
    section = (root / "README.md").read_text().split("## Python API", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    # The files it names, in a folder of its own: two known classes, two queries.
    make_image_tree(tmp_path / "images", {"cat": 3, "dog": 2}, size=20)
    (tmp_path / "support").mkdir()
    for name, source in (("cat_1", "cat/img_000"), ("cat_2", "cat/img_001"), ("dog_1", "dog/img_000")):
        (tmp_path / "support" / f"{name}.jpg").write_bytes((tmp_path / "images" / f"{source}.jpg").read_bytes())
    for name, source in (("query_1", "cat/img_002"), ("query_2", "dog/img_001")):
        (tmp_path / f"{name}.jpg").write_bytes((tmp_path / "images" / f"{source}.jpg").read_bytes())
    save_informative_checkpoint(tmp_path / "outputs" / "ImageNet_resnet18_rel_transformer",
                                [(str(tmp_path / "support" / f"{n}.jpg"), label)
                                 for n, label in (("cat_1", 0), ("cat_2", 0), ("dog_1", 1))], 224)
    if not torch.cuda.is_available():
        snippet = snippet.replace('device="cuda"', 'device="cpu"')
    script = snippet + "\nimport json\nprint(json.dumps([result.normality.tolist(), result.pred.tolist()]))\n"
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    normality, preds = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(normality) == 2 and all(0 < value <= 1 for value in normality) and set(preds) <= {0, 1}
    # It says where its settings and weights came from.
    assert "no args.json in outputs/ImageNet_resnet18_rel_transformer: using image_size=224" in done.stdout
