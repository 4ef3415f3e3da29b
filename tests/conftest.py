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
