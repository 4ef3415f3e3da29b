"""Training pairs for relational reasoning: vectorised pair drawing and the dataset that loads them."""
from numbers import Integral
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets.image_lists import load_image

# Pairs are drawn in blocks of this many so temporaries stay a few tens of MB at ImageNet scale
# (the outputs alone are ~0.25 GB there) while the per-block Python overhead stays negligible.
_BLOCK_PAIRS = 1 << 20


def _index_dtype(n_images: int) -> type:
    """Narrowest index dtype that can address `n_images` images (halves memory at ImageNet scale)."""
    return np.int32 if n_images < 2 ** 31 else np.int64


def _check_labels(labels: np.ndarray) -> np.ndarray:
    """Validate the label array and return it as a 1-D integer numpy array."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {labels.shape}")
    if labels.size == 0:
        raise ValueError("labels is empty: no pairs can be drawn")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.min() < 0:
        raise ValueError(f"labels must be non-negative, got {labels.min()}")
    return labels


def make_pairs(labels: np.ndarray, neg_to_pos_ratio: int, class_balancing: bool,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one pass of (anchor, other, relation) training pairs over the images with `labels`.

    Every image is an anchor; with `class_balancing` each class smaller than the largest also gets
    extra anchors drawn uniformly with replacement from its own images until it has as many anchors
    as the largest class. Each anchor gets 1 positive pair (an image drawn uniformly from the
    anchor's class, possibly the anchor itself; relation 0) followed by R = `neg_to_pos_ratio`
    negative pairs (a class drawn uniformly among the other classes, then an image drawn uniformly
    in it; relation 1). Pair `a * (1 + R) + j` belongs to anchor slot `a`; `j == 0` is its positive.
    A pass holds (1 + R) * n_classes * max_class_size pairs with balancing, (1 + R) * N without;
    the original images come first as anchors, in order, then the extra anchors grouped by class.

    Labels may be any non-negative integers (they need not be contiguous).

    Returns `(anchor_idx, other_idx, relation)`: indices into `labels` as int32 when
    len(labels) < 2**31 (int64 otherwise), and relation as uint8 (0 same class, 1 different).
    Narrow dtypes keep an ImageNet pass (~27M pairs at R = 20) near 0.25 GB.
    """
    labels = _check_labels(labels)
    if isinstance(neg_to_pos_ratio, bool) or not isinstance(neg_to_pos_ratio, Integral):
        raise ValueError(f"neg_to_pos_ratio must be an integer, got {neg_to_pos_ratio!r}")
    if neg_to_pos_ratio < 0:
        raise ValueError(f"neg_to_pos_ratio must be >= 0, got {neg_to_pos_ratio}")
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    ratio = int(neg_to_pos_ratio)
    per_anchor = 1 + ratio

    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    n_classes = len(classes)
    if n_classes < 2:
        raise ValueError(f"labels hold {n_classes} class ({classes.tolist()}): no negative pairs "
                         "exist, at least two classes are needed")

    n_images = len(labels)
    idx_dtype = _index_dtype(n_images)
    class_of = inverse.astype(idx_dtype)  # class ids < n_classes <= n_images
    del inverse
    # Images grouped by class: class c occupies by_class[starts[c] : starts[c] + counts[c]].
    by_class = np.argsort(class_of, kind="stable").astype(idx_dtype)
    starts = np.zeros(n_classes, dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])

    if class_balancing:
        extra_class = np.repeat(np.arange(n_classes), counts.max() - counts)
        extra = by_class[starts[extra_class] + rng.integers(0, counts[extra_class])]
        anchors = np.concatenate([np.arange(n_images, dtype=idx_dtype), extra])
        del extra_class, extra
    else:
        anchors = np.arange(n_images, dtype=idx_dtype)

    n_pairs = len(anchors) * per_anchor
    anchor_idx = np.repeat(anchors, per_anchor)
    del anchors
    relation = np.ones(n_pairs, dtype=np.uint8)
    relation[::per_anchor] = 0
    other_idx = np.empty(n_pairs, dtype=idx_dtype)

    for begin in range(0, n_pairs, _BLOCK_PAIRS):
        end = min(begin + _BLOCK_PAIRS, n_pairs)
        anchor_class = class_of[anchor_idx[begin:end]]
        # Uniform over the other classes: draw among n_classes - 1 and skip over the anchor's own.
        negative_class = rng.integers(0, n_classes - 1, size=end - begin)
        negative_class += negative_class >= anchor_class
        target_class = np.where(relation[begin:end] == 1, negative_class, anchor_class)
        del anchor_class, negative_class
        offset = rng.integers(0, counts[target_class])
        offset += starts[target_class]
        other_idx[begin:end] = by_class[offset]
    return anchor_idx, other_idx, relation


def pass_rng(seed: int, pass_index: int) -> np.random.Generator:
    """Generator for pass `pass_index` of a run: every process and every resume draws the same pairs."""
    for name, value in (("seed", seed), ("pass_index", pass_index)):
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(pass_index)]))


class PairDataset(Dataset):
    """Image pairs `(img_a, img_b, anchor_class, relation)` indexed by the arrays from `make_pairs`.

    `load_truncated` (see `datasets.image_lists.load_image`) travels with the dataset to the workers.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], anchor_idx: np.ndarray,
                 other_idx: np.ndarray, relation: np.ndarray, transform: Callable,
                 load_truncated: bool = False) -> None:
        """Check that the pair arrays match each other and index into `samples`."""
        arrays = {"anchor_idx": np.asarray(anchor_idx), "other_idx": np.asarray(other_idx),
                  "relation": np.asarray(relation)}
        lengths = {name: arr.shape for name, arr in arrays.items()}
        if any(arr.ndim != 1 for arr in arrays.values()) or len(set(lengths.values())) != 1:
            raise ValueError(f"pair arrays must be 1-D with equal lengths, got shapes {lengths}")
        for name in ("anchor_idx", "other_idx"):
            arr = arrays[name]
            if arr.size and (arr.min() < 0 or arr.max() >= len(samples)):
                raise ValueError(f"{name} holds indices in [{arr.min()}, {arr.max()}] but there are "
                                 f"{len(samples)} samples")
        if arrays["relation"].size and not np.isin(arrays["relation"], (0, 1)).all():
            raise ValueError("relation must hold only 0 (same class) and 1 (different class)")
        if not callable(transform):
            raise ValueError(f"transform must be callable, got {transform!r}")
        self.samples = samples
        self.anchor_idx = arrays["anchor_idx"]
        self.other_idx = arrays["other_idx"]
        self.relation = arrays["relation"]
        self.transform = transform
        self.load_truncated = load_truncated

    def __len__(self) -> int:
        """Number of pairs."""
        return len(self.relation)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """Load and transform both images of pair `i`; each image gets its own random augmentation."""
        path_a, anchor_class = self.samples[self.anchor_idx[i]]
        path_b, _ = self.samples[self.other_idx[i]]
        img_a = self.transform(load_image(path_a, self.load_truncated))
        img_b = self.transform(load_image(path_b, self.load_truncated))
        return img_a, img_b, int(anchor_class), int(self.relation[i])
