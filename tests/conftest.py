"""Shared pytest fixtures: tiny generated image trees, deterministic torch."""
import sys
from pathlib import Path

import pytest
import torch

# Tests import the project packages (models, datasets, ...) from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.imagegen import make_image_tree  # noqa: E402


@pytest.fixture(autouse=True)
def _single_thread_torch():
    """Keep each test on one thread: the CI machine has 2 cores and tests must stay quick."""
    torch.set_num_threads(1)
    yield


@pytest.fixture
def image_tree(tmp_path):
    """Factory fixture: image_tree({"dom/cls": n_images, ...}, root=...) -> root Path."""
    def _make(layout, root=None, size=16, seed=0):
        root = Path(root) if root is not None else tmp_path / "data"
        make_image_tree(root, layout, size=size, seed=seed)
        return root
    return _make


def save_informative_checkpoint(folder, support, image_size: int, n_outputs: int = 1, depth: int = 2,
                                seed: int = 0, head_backbone=None):
    """A checkpoint folder whose relational head is refitted on `support` pairs ([(path, label)]).

    With the ViT initialisation (std 0.02) a random head's logits are ~1e-3: every target gets
    nearly the same score and the same predicted class, and equality tests at 1e-6 would compare
    constants. Here the random backbone and blocks are kept, and the head is solved by ridge
    regression on the embeddings of every support pair (-1 same class, +1 different; for a CE head
    column 0 is "same class"): scores then spread over ~0.5 and several classes are predicted (the
    tests assert both). BatchNorm statistics away from (0, 1) make the evaluation's BatchNorm
    folding matter. `head_backbone` (a module giving [N, 512] features): refit the head on its features
    instead of the saved backbone's (a relational module meant for another backbone). Returns the folder.
    """
    from torch import nn

    from models.backbone import ResNetBackbone
    from models.checkpoint import save_model_folder
    from models.relational import RelationalTransformer
    from tests.authors_reference import reference_features

    torch.manual_seed(seed)
    backbone = ResNetBackbone("resnet18", weights=None)
    for module in backbone.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.3, 0.3)
            module.running_var.uniform_(0.5, 1.5)
    relational = RelationalTransformer(feat_dim=512, n_outputs=n_outputs, depth=depth).eval()
    feats = reference_features(backbone if head_backbone is None else head_backbone, [path for path, _ in support],
                               image_size)
    labels = torch.tensor([label for _, label in support])
    first, second = (grid.flatten() for grid in torch.meshgrid(torch.arange(len(labels)),
                                                               torch.arange(len(labels)), indexing="ij"))
    target = (labels[first] != labels[second]).double() * 2 - 1
    head, relational.head = relational.head, nn.Identity()
    with torch.no_grad():
        embedding = relational(feats[first], feats[second]).double()
        design = torch.cat([embedding, torch.ones(len(embedding), 1, dtype=torch.double)], dim=1)
        solution = torch.linalg.solve(design.T @ design + 1e-1 * torch.eye(design.shape[1], dtype=torch.double),
                                      design.T @ target).float()
        signs = torch.tensor([1.0]) if n_outputs == 1 else torch.tensor([-1.0, 1.0])
        head.weight.copy_(signs[:, None] * solution[None, :-1])
        head.bias.copy_(signs * solution[-1])
    relational.head = head
    save_model_folder(str(folder), backbone, relational, iteration=7)
    return folder
