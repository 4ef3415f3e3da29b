"""The Digits benchmark: preparation of the folder tree, its splits and their errors."""
import os

import numpy as np
import pytest
from PIL import Image

import datasets.digits as digits
from datasets.benchmarks import get_eval_split, list_file_names, resolve_targets
from datasets.digits import MANIFEST_FILE, prepare_digits
from datasets.image_lists import DataError, write_list_file
from datasets.train_lists import train_samples


def digits_eval_split(target, data_root, path_to_txt=None):
    """The Digits split through the benchmark table, as the evaluation reads it."""
    return get_eval_split("Digits", target, data_root, path_to_txt)


def digits_train_samples(data_root):
    """The Digits training set through the training-set table, as training reads it."""
    return train_samples("Digits", data_root)

EXPECTED_COUNTS = {
    "train/0": 125, "train/1": 127, "train/2": 124, "train/3": 128, "train/4": 127,
    "heldout/0": 53, "heldout/1": 55, "heldout/2": 53, "heldout/3": 55, "heldout/4": 54,
    "novel_support/5": 91, "novel_support/6": 91, "novel_support/7": 90,
    "novel_query/5": 91, "novel_query/6": 90, "novel_query/7": 89,
    "novel_query/8": 174, "novel_query/9": 180,
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """One prepared Digits tree shared by the read-only tests of this module."""
    root = tmp_path_factory.mktemp("digits_data")
    prepare_digits(str(root))
    return str(root)


def _files(root: str) -> list[str]:
    """Relative paths of every file under root, sorted."""
    found = []
    for folder, _, names in os.walk(root):
        found.extend(os.path.relpath(os.path.join(folder, n), root) for n in names)
    return sorted(found)


def test_prepare_writes_expected_counts(data_root):
    root = os.path.join(data_root, "Digits")
    counts = {f"{split}/{digit}": len(os.listdir(os.path.join(root, split, digit)))
              for split in sorted(os.listdir(root)) if split != MANIFEST_FILE
              for digit in os.listdir(os.path.join(root, split))}
    assert counts == EXPECTED_COUNTS
    assert sum(counts.values()) == 1797
    # Every source image is written exactly once.
    indices = [name for name in _files(root) if name.endswith(".png")]
    assert len({os.path.basename(n) for n in indices}) == 1797
    assert not [n for n in os.listdir(data_root) if n.startswith(".")]


def test_images_are_32px_rgb_digits(data_root):
    from sklearn.datasets import load_digits
    path = os.path.join(data_root, "Digits", "novel_query", "8")
    name = sorted(os.listdir(path))[0]
    with Image.open(os.path.join(path, name)) as image:
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (32, 32)
        pixels = np.asarray(image)
    source = load_digits()
    index = int(name[:-4])
    assert source.target[index] == 8
    expected = np.rint(source.images[index] * 255 / 16).astype(np.uint8)
    np.testing.assert_array_equal(pixels[::4, ::4, 0], expected)
    np.testing.assert_array_equal(pixels[:, :, 0], pixels[:, :, 2])
    assert pixels.max() == 255 and pixels.min() == 0


def test_prepare_is_idempotent(data_root):
    root = os.path.join(data_root, "Digits")
    sample = os.path.join(root, "train", "0", sorted(os.listdir(os.path.join(root, "train", "0")))[0])
    before = (os.stat(sample).st_mtime_ns, os.stat(os.path.join(root, MANIFEST_FILE)).st_mtime_ns)
    assert prepare_digits(data_root) == root
    after = (os.stat(sample).st_mtime_ns, os.stat(os.path.join(root, MANIFEST_FILE)).st_mtime_ns)
    assert before == after


def test_prepare_is_deterministic(data_root, tmp_path):
    other = prepare_digits(str(tmp_path / "other"))
    first = os.path.join(data_root, "Digits")
    assert _files(other) == _files(first)
    for rel in ("train/3", "novel_query/6"):
        name = sorted(os.listdir(os.path.join(first, rel)))[5]
        with Image.open(os.path.join(first, rel, name)) as a, \
                Image.open(os.path.join(other, rel, name)) as b:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_interrupted_preparation_leaves_no_tree(tmp_path, monkeypatch):
    calls = []
    original = digits._save_png

    def failing_save(image, path):
        calls.append(path)
        if len(calls) > 300:
            raise KeyboardInterrupt("simulated interruption")
        original(image, path)

    monkeypatch.setattr(digits, "_save_png", failing_save)
    with pytest.raises(KeyboardInterrupt):
        prepare_digits(str(tmp_path))
    assert len(calls) == 301
    assert os.listdir(tmp_path) == []
    with pytest.raises(DataError, match="prepare_digits"):
        digits_eval_split("seen", str(tmp_path))


def test_incomplete_tree_is_refused(tmp_path):
    (tmp_path / "Digits" / "train" / "0").mkdir(parents=True)
    with pytest.raises(DataError, match="no manifest.json"):
        prepare_digits(str(tmp_path))


def test_seen_split(data_root):
    split = digits_eval_split("seen", data_root)
    assert split.dataset == "Digits" and split.target == "seen"
    assert split.known_classes == 5
    assert split.class_names == [str(d) for d in range(10)]
    assert len(split.support) == 631 and len(split.scored) == 1166
    assert [p for p, _ in split.support] == sorted(p for p, _ in split.support)
    assert [p for p, _ in split.scored] == sorted(p for p, _ in split.scored)
    support_labels = np.bincount([label for _, label in split.support], minlength=10)
    scored_labels = np.bincount([label for _, label in split.scored], minlength=10)
    assert support_labels.tolist() == [125, 127, 124, 128, 127, 0, 0, 0, 0, 0]
    assert scored_labels.tolist() == [53, 55, 53, 55, 54, 182, 181, 179, 174, 180]
    for path, label in split.support + split.scored:
        assert os.path.basename(os.path.dirname(path)) == split.class_names[label]
    train = set(digits_train_samples(data_root))
    assert train == set(split.support)
    assert not {p for p, _ in train} & {p for p, _ in split.scored}


def test_novel_split(data_root):
    split = digits_eval_split("novel", data_root)
    assert split.known_classes == 3
    assert split.class_names == ["5", "6", "7", "8", "9"]
    assert len(split.support) == 272 and len(split.scored) == 624
    assert np.bincount([label for _, label in split.support]).tolist() == [91, 91, 90]
    assert np.bincount([label for _, label in split.scored]).tolist() == [91, 90, 89, 174, 180]
    support_paths = {p for p, _ in split.support}
    assert not support_paths & {p for p, _ in split.scored}
    for path, label in split.support + split.scored:
        assert os.path.basename(os.path.dirname(path)) == split.class_names[label]
    # Nothing of this target was ever trained on.
    train_paths = {p for p, _ in digits_train_samples(data_root)}
    assert not train_paths & (support_paths | {p for p, _ in split.scored})


def test_seen_unknowns_are_every_image_of_5_to_9(data_root):
    seen = digits_eval_split("seen", data_root)
    novel = digits_eval_split("novel", data_root)
    seen_unknown = {p for p, label in seen.scored if label >= 5}
    assert seen_unknown == {p for p, _ in novel.support} | {p for p, _ in novel.scored}
    assert len(seen_unknown) == 896


def test_split_from_list_files(data_root, tmp_path):
    split = digits_eval_split("novel", data_root)
    support_name, scored_name = list_file_names("Digits", "novel")
    assert (support_name, scored_name) == ("novel_support.txt", "novel.txt")
    write_list_file(str(tmp_path / "Digits" / support_name), split.support[:4], data_root)
    write_list_file(str(tmp_path / "Digits" / scored_name), split.scored[-3:], data_root)
    with open(tmp_path / "Digits" / support_name) as handle:
        assert handle.readline().startswith("Digits/novel_support/5/")
    from_lists = digits_eval_split("novel", data_root, path_to_txt=str(tmp_path))
    assert from_lists.support == split.support[:4]
    assert from_lists.scored == split.scored[-3:]
    write_list_file(str(tmp_path / "Digits" / scored_name), [(split.scored[0][0], 5)], data_root)
    with pytest.raises(DataError, match=r"labels \[5\] are outside 0..4"):
        digits_eval_split("novel", data_root, path_to_txt=str(tmp_path))


def test_errors(data_root, tmp_path):
    with pytest.raises(DataError, match="seen, novel"):
        digits_eval_split("unseen", data_root)
    with pytest.raises(DataError, match="seen, novel"):
        list_file_names("Digits", "all")
    with pytest.raises(DataError, match="python train.py --demo"):
        digits_eval_split("novel", str(tmp_path))
    with pytest.raises(DataError, match="prepare_digits"):
        digits_train_samples(str(tmp_path))
    with pytest.raises(DataError, match="data root"):
        digits_eval_split("seen", None)
    assert resolve_targets("Digits", "all") == ["seen", "novel"]


def test_tampered_tree_is_refused(tmp_path):
    root = prepare_digits(str(tmp_path))
    victim = os.path.join(root, "heldout", "2")
    os.remove(os.path.join(victim, sorted(os.listdir(victim))[0]))
    with pytest.raises(DataError, match="holds 52 images, its manifest says 53"):
        prepare_digits(str(tmp_path))
