"""Writes tiny JPEG/PNG image trees for tests (no real data set is available offline)."""
from pathlib import Path
from typing import Mapping

import numpy as np
from PIL import Image


def make_image_tree(root: Path, layout: Mapping[str, int], size: int = 16, seed: int = 0,
                    ext: str = ".jpg") -> None:
    """Create `layout[relative_class_dir]` images in each `root/relative_class_dir`.

    Each class gets its own mean colour so that features differ between classes.
    """
    rng = np.random.default_rng(seed)
    for class_index, (rel_dir, count) in enumerate(sorted(layout.items())):
        folder = Path(root) / rel_dir
        folder.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, size=3)
        for i in range(count):
            noise = rng.integers(-40, 40, size=(size, size, 3))
            pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"img_{i:03d}{ext}")
