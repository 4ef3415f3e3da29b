"""Pair drawing semantics, determinism, dtypes and errors; PairDataset on a tiny image tree."""
import re

import numpy as np
import pytest
import torch

import datasets.pairs as pairs_module
from datasets.image_lists import DataError, list_images
from datasets.pairs import PairDataset, _index_dtype, make_pairs, pass_rng
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


def test_many_classes_counts():
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(100), rng.integers(3, 12, size=100)))
    ratio = 5
    anchor, other, relation = make_pairs(labels, ratio, True, pass_rng(0, 1))
    max_size = np.bincount(labels).max()
    assert len(anchor) == (1 + ratio) * 100 * max_size
    assert np.array_equal(relation, (labels[anchor] != labels[other]).astype(np.uint8))
    assert relation.sum() == ratio * 100 * max_size


def _raises_exactly(message):
    """pytest.raises(ValueError) whose message must be exactly `message`."""
    return pytest.raises(ValueError, match="^" + re.escape(message) + "$")


@pytest.mark.parametrize("labels, ratio, message", [
    (np.array([3, 3, 3]), 1,
     "labels hold 1 class ([3]): no negative pairs exist, at least two classes are needed"),
    (LABELS, -1, "neg_to_pos_ratio must be >= 0, got -1"),
    (LABELS, 1.5, "neg_to_pos_ratio must be an integer, got 1.5"),
    (LABELS, True, "neg_to_pos_ratio must be an integer, got True"),
    (np.array([], dtype=np.int64), 1, "labels is empty: no pairs can be drawn"),
    (np.array([0, -1, 2]), 1, "labels must be non-negative, got -1"),
    (np.array([0.0, 1.0]), 1, "labels must be integers, got dtype float64"),
    (np.array([[0, 1], [1, 0]]), 1, "labels must be a 1-D array, got shape (2, 2)"),
])
def test_make_pairs_errors(labels, ratio, message):
    with _raises_exactly(message):
        make_pairs(labels, ratio, False, pass_rng(0, 0))


def test_make_pairs_rejects_legacy_random_state():
    with _raises_exactly("rng must be a numpy.random.Generator, got RandomState"):
        make_pairs(LABELS, 1, False, np.random.RandomState(0))


@pytest.mark.parametrize("seed, pass_index, message", [
    (-1, 0, "seed must be a non-negative integer, got -1"),
    (0, -2, "pass_index must be a non-negative integer, got -2"),
    (0.5, 0, "seed must be a non-negative integer, got 0.5"),
    (True, 0, "seed must be a non-negative integer, got True"),
    (3, 1.0, "pass_index must be a non-negative integer, got 1.0"),
])
def test_pass_rng_errors(seed, pass_index, message):
    with _raises_exactly(message):
        pass_rng(seed, pass_index)


def test_pass_rng_is_the_seed_sequence_of_seed_and_pass():
    expected = np.random.default_rng(np.random.SeedSequence([5, 3])).integers(0, 2 ** 62, size=4)
    assert np.array_equal(pass_rng(5, 3).integers(0, 2 ** 62, size=4), expected)
    assert np.array_equal(pass_rng(np.int64(5), np.uint8(3)).integers(0, 2 ** 62, size=4), expected)


def test_index_dtype_switches_at_two_to_the_31():
    assert _index_dtype(1000) is np.int32
    assert _index_dtype(2 ** 31 - 1) is np.int32
    assert _index_dtype(2 ** 31) is np.int64


@pytest.mark.parametrize("balancing", [False, True])
def test_dtypes_with_and_without_balancing(balancing):
    anchor, other, relation = make_pairs(LABELS, 2, balancing, pass_rng(0, 0))
    assert (anchor.dtype, other.dtype, relation.dtype) == (np.int32, np.int32, np.uint8)


class ExtremeGenerator(np.random.Generator):
    """A Generator whose `integers` always returns its lowest (or highest) value, and logs each call."""

    def __init__(self, highest: bool):
        super().__init__(np.random.PCG64(0))
        self.highest = highest
        self.sizes = []

    def integers(self, low, high=None, size=None):
        if high is None:
            low, high = 0, low
        value = np.asarray(high) - 1 if self.highest else np.asarray(low)
        shape = np.shape(high) if size is None else size
        self.sizes.append(int(np.prod(shape)))
        return np.broadcast_to(value, shape).astype(np.int64)


# 3 classes: label 9 at 0, 3, 6, 8; label 4 at 1, 4; label 5 at 2, 5, 7 (+ 30 more of label 5 at 9..38,
# so that the within-class order cannot come from a small-array insertion sort).
ORDER_LABELS = np.array([9, 4, 5, 9, 4, 5, 9, 5, 9] + [5] * 30)


def test_lowest_draws_pick_first_images_and_the_first_other_class():
    ratio = 2
    anchor, other, _ = make_pairs(ORDER_LABELS, ratio, False, ExtremeGenerator(highest=False))
    anchor, other = anchor.reshape(-1, 1 + ratio), other.reshape(-1, 1 + ratio)
    first_image = {4: 1, 5: 2, 9: 0}  # lowest index of each label
    # Positive partner: the first image of the anchor's class (classes ordered 4 < 5 < 9).
    assert other[:, 0].tolist() == [first_image[label] for label in ORDER_LABELS]
    # Negative class 0 (label 4), skipped over to class 1 (label 5) for anchors of label 4.
    expected_negative = [first_image[5] if label == 4 else first_image[4] for label in ORDER_LABELS]
    assert (other[:, 1:] == np.array(expected_negative)[:, None]).all()


def test_highest_draws_pick_last_images_and_the_last_other_class():
    ratio = 1
    rng = ExtremeGenerator(highest=True)
    anchor, other, _ = make_pairs(ORDER_LABELS, ratio, True, rng)
    anchor, other = anchor.reshape(-1, 1 + ratio), other.reshape(-1, 1 + ratio)
    last_image = {4: 4, 5: 38, 9: 8}  # highest index of each label
    labels = ORDER_LABELS[anchor[:, 0]]
    # Extra anchors (balancing to 33 per class) are each class's last image.
    assert anchor[len(ORDER_LABELS):, 0].tolist() == [4] * 31 + [8] * 29
    assert other[:, 0].tolist() == [last_image[label] for label in labels]
    # Negative draw n_classes - 2 = class 1 (label 5), moved to class 2 (label 9) unless above the anchor's.
    assert other[:, 1].tolist() == [last_image[9] if label in (4, 5) else last_image[5] for label in labels]
    # One draw for the extra anchors, then one block: negative classes, then partners.
    assert rng.sizes == [60, 2 * 99, 2 * 99]


def test_pairs_are_drawn_in_blocks(monkeypatch):
    """Pairs are drawn _BLOCK_PAIRS at a time (bounded temporaries); every block is complete."""
    monkeypatch.setattr(pairs_module, "_BLOCK_PAIRS", 7)
    rng = ExtremeGenerator(highest=False)
    anchor, other, relation = make_pairs(LABELS, 2, False, rng)
    n_pairs = 3 * len(LABELS)  # 33: blocks of 7, 7, 7, 7, 5
    assert rng.sizes == [7, 7] * 4 + [5, 5]
    expected = make_pairs(LABELS, 2, False, ExtremeGenerator(highest=False))
    monkeypatch.undo()
    for got, want in zip((anchor, other, relation), expected):
        assert len(got) == n_pairs and np.array_equal(got, want)
    # With a real generator, several blocks still give valid pairs of every kind.
    monkeypatch.setattr(pairs_module, "_BLOCK_PAIRS", 5)
    anchor, other, relation = make_pairs(LABELS, 3, True, pass_rng(9, 0))
    assert np.array_equal(relation, (LABELS[anchor] != LABELS[other]).astype(np.uint8))
    assert (relation.reshape(-1, 4)[:, 0] == 0).all() and (relation.reshape(-1, 4)[:, 1:] == 1).all()


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


@pytest.mark.parametrize("anchor, other, relation, message", [
    ([0, 1], [0], [0], ("pair arrays must be 1-D with equal lengths, got shapes "
                        "{'anchor_idx': (2,), 'other_idx': (1,), 'relation': (1,)}")),
    ([[0]], [[0]], [[0]], ("pair arrays must be 1-D with equal lengths, got shapes "
                           "{'anchor_idx': (1, 1), 'other_idx': (1, 1), 'relation': (1, 1)}")),
    ([0], [9], [0], "other_idx holds indices in [9, 9] but there are 5 samples"),
    ([0], [5], [0], "other_idx holds indices in [5, 5] but there are 5 samples"),  # one past the end
    ([5, 0], [0, 0], [0, 0], "anchor_idx holds indices in [0, 5] but there are 5 samples"),
    ([-1], [0], [0], "anchor_idx holds indices in [-1, -1] but there are 5 samples"),
    ([0], [0], [2], "relation must hold only 0 (same class) and 1 (different class)"),
])
def test_pair_dataset_validation(tiny_samples, anchor, other, relation, message):
    with _raises_exactly(message):
        PairDataset(tiny_samples, np.array(anchor), np.array(other), np.array(relation),
                    eval_transform(8))


def test_pair_dataset_accepts_the_last_index_and_needs_a_callable_transform(tiny_samples):
    dataset = PairDataset(tiny_samples, np.array([4]), np.array([4]), np.array([0]), eval_transform(8))
    assert dataset[0][2:] == (5, 0)
    with _raises_exactly("transform must be callable, got None"):
        PairDataset(tiny_samples, np.array([0]), np.array([0]), np.array([0]), None)
