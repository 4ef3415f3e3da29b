"""Pair drawing semantics, determinism, dtypes and errors; PairDataset on a tiny image tree."""
import numpy as np
import pytest
import torch

from datasets.image_lists import DataError, list_images
from datasets.pairs import PairDataset, make_pairs, pass_rng
from datasets.transforms import eval_transform

# Non-contiguous labels with unequal class sizes: 7 -> 5 images, 2 -> 2, 40 -> 3, 0 -> 1.
LABELS = np.array([7, 2, 40, 7, 7, 0, 40, 2, 7, 40, 7])


def _per_anchor(pairs, ratio):
    """Reshape the flat pair arrays to one row of 1 + R pairs per anchor."""
    return [a.reshape(-1, 1 + ratio) for a in pairs]


@pytest.mark.parametrize("balancing", [False, True])
def test_every_anchor_has_one_positive_and_r_negatives(balancing):
    ratio = 3
    anchor, other, relation = _per_anchor(make_pairs(LABELS, ratio, balancing, pass_rng(0, 0)), ratio)
    assert (anchor == anchor[:, :1]).all()
    assert (relation[:, 0] == 0).all() and (relation[:, 1:] == 1).all()
    anchor_label = LABELS[anchor]
    other_label = LABELS[other]
    assert (other_label[:, 0] == anchor_label[:, 0]).all()
    assert (other_label[:, 1:] != anchor_label[:, 1:]).all()
    assert np.array_equal(relation, (other_label != anchor_label).astype(np.uint8))


def test_counts_without_balancing_and_anchor_order():
    ratio = 4
    anchor, other, relation = make_pairs(LABELS, ratio, False, pass_rng(1, 0))
    assert len(anchor) == len(other) == len(relation) == (1 + ratio) * len(LABELS)
    assert np.array_equal(anchor[::1 + ratio], np.arange(len(LABELS)))


def test_counts_with_balancing_and_extra_anchors():
    ratio = 2
    anchor, _, _ = make_pairs(LABELS, ratio, True, pass_rng(2, 0))
    n_classes, max_size = 4, 5
    assert len(anchor) == (1 + ratio) * n_classes * max_size
    anchors = anchor[::1 + ratio]
    # Every original image is an anchor, first and in order; the extras bring each class to max_size.
    assert np.array_equal(anchors[:len(LABELS)], np.arange(len(LABELS)))
    values, counts = np.unique(LABELS[anchors], return_counts=True)
    assert values.tolist() == [0, 2, 7, 40]
    assert counts.tolist() == [max_size] * n_classes
    extras = anchors[len(LABELS):]
    # Extras are grouped by class (sorted label order) and the largest class (7) gets none.
    assert LABELS[extras].tolist() == [0] * 4 + [2] * 3 + [40] * 2


def test_single_image_class_positive_is_the_anchor_itself():
    anchor, other, relation = make_pairs(LABELS, 1, False, pass_rng(3, 0))
    only = int(np.flatnonzero(LABELS == 0)[0])
    positive = (anchor == only) & (relation == 0)
    assert other[positive].tolist() == [only]


def test_negative_classes_are_uniform_not_size_weighted():
    # Class sizes 1, 10, 50, 100: size-weighted drawing would give class 3 about 100x class 0.
    labels = np.repeat(np.arange(4), [1, 10, 50, 100])
    ratio = 60
    anchor, other, relation = make_pairs(labels, ratio, False, pass_rng(4, 0))
    negative = relation == 1
    anchor_class, other_class = labels[anchor[negative]], labels[other[negative]]
    for c in range(4):
        observed = np.bincount(other_class[anchor_class == c], minlength=4)
        assert observed[c] == 0
        observed = np.delete(observed, c)
        expected = observed.sum() / 3
        chi_square = ((observed - expected) ** 2 / expected).sum()
        # df = 2: 99.9% quantile is 13.8; size weighting would give thousands.
        assert chi_square < 13.8, (c, observed)


def test_images_within_a_class_are_uniform():
    labels = np.repeat(np.arange(2), [8, 8])
    ratio = 50
    anchor, other, relation = make_pairs(labels, ratio, False, pass_rng(5, 0))
    # Negatives of class-0 anchors land in class 1 (images 8..15): each image equally often.
    picked = other[(relation == 1) & (labels[anchor] == 0)] - 8
    observed = np.bincount(picked, minlength=8)
    expected = observed.sum() / 8
    assert ((observed - expected) ** 2 / expected).sum() < 24.3  # df = 7, 99.9% quantile


def test_extra_anchors_are_drawn_from_their_class_uniformly():
    labels = np.repeat(np.arange(2), [400, 4])
    anchor, _, _ = make_pairs(labels, 0, True, pass_rng(6, 0))
    extras = anchor[len(labels):]
    assert len(extras) == 396 and set(extras.tolist()) <= {400, 401, 402, 403}
    observed = np.bincount(extras - 400, minlength=4)
    assert ((observed - 99) ** 2 / 99).sum() < 16.3  # df = 3, 99.9% quantile


def test_determinism_from_seed_and_pass():
    first = make_pairs(LABELS, 3, True, pass_rng(11, 2))
    again = make_pairs(LABELS, 3, True, pass_rng(11, 2))
    next_pass = make_pairs(LABELS, 3, True, pass_rng(11, 3))
    other_seed = make_pairs(LABELS, 3, True, pass_rng(12, 2))
    for a, b in zip(first, again):
        assert np.array_equal(a, b)
    assert not np.array_equal(first[1], next_pass[1])
    assert not np.array_equal(first[1], other_seed[1])


def test_dtypes():
    anchor, other, relation = make_pairs(LABELS, 2, True, pass_rng(0, 0))
    assert anchor.dtype == np.int32 and other.dtype == np.int32
    assert relation.dtype == np.uint8


def test_many_classes_counts():
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(100), rng.integers(3, 12, size=100)))
    ratio = 5
    anchor, other, relation = make_pairs(labels, ratio, True, pass_rng(0, 1))
    max_size = np.bincount(labels).max()
    assert len(anchor) == (1 + ratio) * 100 * max_size
    assert np.array_equal(relation, (labels[anchor] != labels[other]).astype(np.uint8))
    assert relation.sum() == ratio * 100 * max_size


@pytest.mark.parametrize("labels, ratio, match", [
    (np.array([3, 3, 3]), 1, "no negative pairs"),
    (LABELS, -1, "neg_to_pos_ratio"),
    (LABELS, 1.5, "neg_to_pos_ratio"),
    (np.array([], dtype=np.int64), 1, "empty"),
    (np.array([0, -1, 2]), 1, "non-negative"),
    (np.array([0.0, 1.0]), 1, "integers"),
    (np.array([[0, 1], [1, 0]]), 1, "1-D"),
])
def test_make_pairs_errors(labels, ratio, match):
    with pytest.raises(ValueError, match=match):
        make_pairs(labels, ratio, False, pass_rng(0, 0))


def test_make_pairs_rejects_legacy_random_state():
    with pytest.raises(ValueError, match="Generator"):
        make_pairs(LABELS, 1, False, np.random.RandomState(0))


@pytest.mark.parametrize("seed, pass_index", [(-1, 0), (0, -2), (0.5, 0)])
def test_pass_rng_errors(seed, pass_index):
    with pytest.raises(ValueError):
        pass_rng(seed, pass_index)


@pytest.fixture
def tiny_samples(image_tree):
    root = image_tree({"cat": 3, "dog": 2}, size=16)
    return ([(p, 0) for p in list_images(root / "cat")] + [(p, 5) for p in list_images(root / "dog")])


def test_pair_dataset_items(tiny_samples):
    labels = np.array([label for _, label in tiny_samples])
    anchor, other, relation = make_pairs(labels, 2, True, pass_rng(0, 0))
    dataset = PairDataset(tiny_samples, anchor, other, relation, eval_transform(8))
    assert len(dataset) == 3 * 2 * 3
    for i in (0, 1, 2, len(dataset) - 1):
        img_a, img_b, anchor_class, rel = dataset[i]
        assert isinstance(img_a, torch.Tensor) and img_a.shape == (3, 8, 8)
        assert img_b.shape == (3, 8, 8)
        assert type(anchor_class) is int and anchor_class == labels[anchor[i]]
        assert type(rel) is int and rel == int(labels[anchor[i]] != labels[other[i]])
    # Pair 0 is the first image with its positive, pair 1 one of its negatives (a dog).
    assert dataset[0][2:] == (0, 0) and dataset[1][2:] == (0, 1)


def test_pair_dataset_missing_image_names_path(tiny_samples, tmp_path):
    missing = str(tmp_path / "gone.jpg")
    samples = tiny_samples + [(missing, 5)]
    dataset = PairDataset(samples, np.array([5]), np.array([0]), np.array([1]), eval_transform(8))
    with pytest.raises(DataError, match="gone.jpg"):
        dataset[0]


@pytest.mark.parametrize("anchor, other, relation, match", [
    ([0, 1], [0], [0], "equal lengths"),
    ([0], [9], [0], "other_idx"),
    ([-1], [0], [0], "anchor_idx"),
    ([0], [0], [2], "relation"),
])
def test_pair_dataset_validation(tiny_samples, anchor, other, relation, match):
    with pytest.raises(ValueError, match=match):
        PairDataset(tiny_samples, np.array(anchor), np.array(other), np.array(relation),
                    eval_transform(8))
