"""Jigsaw-shuffled images: the pseudo-novel inputs FeatureNorm's block selection compares against.

The image is cut into grid x grid equal tiles that are put back at randomly permuted positions
(never the identity permutation). When H or W is not a multiple of `grid` (224 with grid 3) only
the top-left region of the largest multiple (222 x 222) is tiled; the remaining bottom rows and
right columns stay where they are. Tiles are moved, never resampled, so the output holds exactly
the input pixels.

For a dataset, `JigsawTransform(base_transform, seed)` applies the evaluation transform and then
shuffles. Its permutation is drawn from a generator seeded by `seed` and a hash of the image's own
pixels, so the result depends on nothing but (seed, image): it is the same in any DataLoader
worker, in any order, and in any process of a distributed run (a per-call counter would not be).
Shuffling after Normalize is equivalent to shuffling before it, since Normalize is per channel.
"""
from __future__ import annotations

import hashlib
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def random_non_identity_permutation(n: int, generator: torch.Generator | None) -> Tensor:
    """A uniformly random permutation of range(n) other than the identity (n >= 2)."""
    if n < 2:
        raise ValueError(f"a non-identity permutation needs at least 2 elements, got {n}")
    identity = torch.arange(n)
    while True:
        # Rejection keeps the draw uniform over the n! - 1 non-identity permutations; for 9 tiles
        # a retry happens with probability 1 / 362880.
        perm = torch.randperm(n, generator=generator)
        if not torch.equal(perm, identity):
            return perm


def _shuffle_one(image: Tensor, grid: int, perm: Tensor) -> Tensor:
    """Reassemble one [C, H, W] image with tile perm[k] placed at tile position k (row-major)."""
    channels, height, width = image.shape
    tile_h, tile_w = height // grid, width // grid
    region = image[:, : tile_h * grid, : tile_w * grid]
    # [C, gh, th, gw, tw] -> [gh*gw, C, th, tw]: one entry per tile in row-major order.
    tiles = region.reshape(channels, grid, tile_h, grid, tile_w).permute(1, 3, 0, 2, 4)
    tiles = tiles.reshape(grid * grid, channels, tile_h, tile_w)[perm.to(image.device)]
    shuffled = tiles.reshape(grid, grid, channels, tile_h, tile_w).permute(2, 0, 3, 1, 4)
    out = image.clone()
    out[:, : tile_h * grid, : tile_w * grid] = shuffled.reshape(channels, tile_h * grid, tile_w * grid)
    return out


def jigsaw_shuffle(image: Tensor, grid: int = 3, generator: torch.Generator | None = None) -> Tensor:
    """Permute the grid x grid tiles of a [C, H, W] or [B, C, H, W] image (own permutation per image)."""
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 2:
        raise ValueError(f"grid must be an integer >= 2, got {grid!r}")
    if image.ndim not in (3, 4):
        raise ValueError(f"image must be [C, H, W] or [B, C, H, W], got shape {tuple(image.shape)}")
    height, width = image.shape[-2:]
    if height < grid or width < grid:
        raise ValueError(f"image of size {height}x{width} is smaller than the {grid}x{grid} jigsaw grid")
    if image.ndim == 3:
        return _shuffle_one(image, grid, random_non_identity_permutation(grid * grid, generator))
    return torch.stack([
        _shuffle_one(single, grid, random_non_identity_permutation(grid * grid, generator))
        for single in image
    ])


def content_seed(data: bytes, seed: int) -> int:
    """A 63-bit generator seed determined by `seed` and the bytes `data` (stable across processes)."""
    digest = hashlib.blake2b(data, digest_size=8, key=str(int(seed)).encode()).digest()
    return int.from_bytes(digest, "little") >> 1


def _image_bytes(image: Image.Image | Tensor | np.ndarray) -> bytes:
    """Raw bytes identifying an input image (PIL mode/size are part of it)."""
    if isinstance(image, Image.Image):
        return f"{image.mode}{image.size}".encode() + image.tobytes()
    if isinstance(image, Tensor):
        return image.detach().cpu().contiguous().numpy().tobytes()
    if isinstance(image, np.ndarray):
        return np.ascontiguousarray(image).tobytes()
    raise ValueError(f"JigsawTransform expects a PIL image, tensor or array, got {type(image).__name__}")


class JigsawTransform:
    """base_transform, then a jigsaw shuffle whose permutation is seeded by (seed, input pixels)."""

    def __init__(self, base_transform: Callable, seed: int = 0, grid: int = 3) -> None:
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 2:
            raise ValueError(f"grid must be an integer >= 2, got {grid!r}")
        self.base_transform = base_transform
        self.seed = int(seed)
        self.grid = grid

    def __call__(self, image: Image.Image | Tensor | np.ndarray) -> Tensor:
        """Transformed image [C, H, W] with its tiles permuted deterministically."""
        generator = torch.Generator().manual_seed(content_seed(_image_bytes(image), self.seed))
        tensor = self.base_transform(image)
        if not isinstance(tensor, Tensor) or tensor.ndim != 3:
            raise ValueError(
                f"base_transform must return a [C, H, W] tensor, got {type(tensor).__name__} "
                f"with shape {tuple(getattr(tensor, 'shape', ()))}")
        return jigsaw_shuffle(tensor, self.grid, generator)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_transform={self.base_transform!r}, seed={self.seed}, grid={self.grid})"
