"""Tests for evaluation.api.NoveltyDetector, the plug-and-play Python API."""
import numpy as np
import pytest
import torch
from torch import nn

from evaluation.api import NoveltyDetector
from models.backbone import ResNetBackbone
from models.checkpoint import save_model_folder
from models.relational import RelationalTransformer
from tests.naive_resend import naive_resend_scores

IMAGE_SIZE = 32


@pytest.fixture
def checkpoint(tmp_path):
    """A random checkpoint folder whose BatchNorms have non-trivial statistics (folding must matter)."""
    torch.manual_seed(0)
    backbone = ResNetBackbone("resnet18", weights=None)
    for module in backbone.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.3, 0.3)
            module.running_var.uniform_(0.5, 1.5)
    save_model_folder(str(tmp_path / "ckpt"), backbone, RelationalTransformer(depth=2), iteration=3)
    return tmp_path / "ckpt"


@pytest.fixture
def images(image_tree, tmp_path):
    """(support paths, support labels, query paths): two known classes, queries from them and a novel one."""
    root = image_tree({"a": 3, "b": 3, "novel": 2}, root=tmp_path / "img", size=20)
    support = [str(root / c / f"img_{i:03d}.jpg") for c in ("a", "b") for i in range(2)]
    queries = [str(root / c / f"img_{i:03d}.jpg") for c, i in (("a", 2), ("b", 2), ("novel", 0), ("novel", 1))]
    return support, [0, 0, 1, 1], queries


def test_detector_matches_naive_algorithm(checkpoint, images):
    support, labels, queries = images
    detector = NoveltyDetector.from_folder(str(checkpoint), image_size=IMAGE_SIZE, batch_size=3)
    result = detector.fit(support, labels).score(queries)
    normality, preds = naive_resend_scores(detector.model.backbone, detector.model.relational,
                                           list(zip(support, labels)), queries, 2, IMAGE_SIZE)
    np.testing.assert_allclose(result.normality.numpy(), normality, atol=1e-5)
    assert np.array_equal(result.pred.numpy(), preds)
    # The loaded model is left as loaded (its BatchNorms are not folded away).
    assert any(isinstance(m, nn.BatchNorm2d) for m in detector.model.backbone.modules())


def test_detector_accepts_features(checkpoint, images):
    support, labels, queries = images
    detector = NoveltyDetector.from_folder(str(checkpoint), image_size=IMAGE_SIZE)
    from_images = detector.fit(support, labels).score(queries)
    from_feats = detector.fit(detector.features(support), labels).score(detector.features(queries))
    assert torch.allclose(from_images.normality, from_feats.normality, atol=1e-6)


def test_detector_bad_use(checkpoint, images):
    support, labels, queries = images
    detector = NoveltyDetector.from_folder(str(checkpoint), image_size=IMAGE_SIZE)
    with pytest.raises(RuntimeError, match="fit"):
        detector.score(queries)
    with pytest.raises(ValueError, match="4 support samples but 3 labels"):
        detector.fit(support, labels[:3])
    with pytest.raises(ValueError, match=r"\[N, 512\]"):
        detector.fit(torch.zeros(4, 16), labels)
    with pytest.raises(ValueError, match="no images"):
        detector.features([])
