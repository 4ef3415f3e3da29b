"""Tests for image discovery, list files, image loading, transforms and training lists."""
import gzip
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import train_lists
from datasets.image_lists import (DataError, ImageListDataset, check_files_exist, list_images,
                                  list_subfolders, load_image, read_list_file, write_list_file)
from datasets.train_lists import (folder_train_samples, imagenet_train_samples, train_samples)
from datasets.transforms import eval_transform, train_transform

IMAGENET_TRAIN = Path("ImageNet/Data/CLS-LOC/train")


def _write_image(path: Path, size: tuple[int, int] = (12, 10), fmt: str | None = None) -> None:
    """Write a small random RGB image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)


# ---------------------------------------------------------------------------------------------
# Image discovery.

def test_list_images_filters_sorts_and_is_case_insensitive(tmp_path):
    folder = tmp_path / "cls"
    for name in ("b.JPG", "a.png", "c.Jpeg", "d.webp", "e.TIFF", "f.bmp", "g.gif"):
        _write_image(folder / name, fmt={"b.JPG": "JPEG", "c.Jpeg": "JPEG", "e.TIFF": "TIFF"}
                     .get(name))
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.jpg").write_bytes((folder / "b.JPG").read_bytes())
    (folder / "sub.jpg").mkdir()  # a directory named like an image is not an image
    found = list_images(str(folder))
    assert [os.path.basename(p) for p in found] == [
        "a.png", "b.JPG", "c.Jpeg", "d.webp", "e.TIFF", "f.bmp", "g.gif"]
    assert all(os.path.isabs(p) for p in found)


def test_list_images_missing_folder_names_it(tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "nope"))):
        list_images(str(tmp_path / "nope"))


def test_list_subfolders_sorted_and_skips_hidden(tmp_path):
    for name in ("zeta", "alpha", ".git", "Mid"):
        (tmp_path / name).mkdir()
    (tmp_path / "file.jpg").write_bytes(b"x")
    assert list_subfolders(str(tmp_path)) == ["Mid", "alpha", "zeta"]


# ---------------------------------------------------------------------------------------------
# List files.

def test_list_file_round_trip_with_spaces(tmp_path):
    root = tmp_path / "root"
    samples = [(str(root / "dom a" / "cls" / "img 1.jpg"), 3), (str(root / "x.png"), 0)]
    list_path = tmp_path / "lists" / "deep" / "l.txt"
    write_list_file(str(list_path), samples, str(root))
    assert list_path.read_text() == "dom a/cls/img 1.jpg 3\nx.png 0\n"
    assert read_list_file(str(list_path), str(root)) == samples
    assert [p.name for p in list_path.parent.iterdir()] == ["l.txt"]  # no temp file left


def test_write_list_file_rejects_paths_outside_root(tmp_path):
    with pytest.raises(DataError, match="elsewhere.jpg.*not inside"):
        write_list_file(str(tmp_path / "l.txt"), [(str(tmp_path / "elsewhere.jpg"), 0)],
                        str(tmp_path / "root"))
    assert not (tmp_path / "l.txt").exists()


@pytest.mark.parametrize("bad_line", ["lonely_token.jpg", "a/b.jpg notanint", "a/b.jpg 1.5"])
def test_read_list_file_malformed_line_names_file_and_line(tmp_path, bad_line):
    list_path = tmp_path / "list.txt"
    list_path.write_text(f"a/ok.jpg 0\n\na/ok2.jpg 1\n{bad_line}\n")
    with pytest.raises(DataError, match=re.escape(f"{list_path}, line 4")):
        read_list_file(str(list_path), str(tmp_path))


def test_read_list_file_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "absent.txt"))):
        read_list_file(str(tmp_path / "absent.txt"), str(tmp_path))


def test_check_files_exist_names_missing_paths(tmp_path):
    _write_image(tmp_path / "d" / "here.png")
    missing_same_dir = str(tmp_path / "d" / "gone.png")
    missing_dir = str(tmp_path / "nodir" / "x.png")
    check_files_exist([(str(tmp_path / "d" / "here.png"), 0)])
    with pytest.raises(DataError, match="2 listed image") as info:
        check_files_exist([(str(tmp_path / "d" / "here.png"), 0), (missing_same_dir, 1),
                           (missing_dir, 0)])
    assert missing_same_dir in str(info.value) and missing_dir in str(info.value)


# ---------------------------------------------------------------------------------------------
# Image loading and datasets.

def _noise_jpeg(path, size=64):
    """A JPEG of random pixels (long enough that truncating it loses image data)."""
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "JPEG")
    return path.read_bytes()


def test_truncated_jpeg_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "cut.jpg"
    data = _noise_jpeg(path)
    path.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(DataError, match=re.escape(f"cannot read image {path}: image file is truncated")):
        load_image(str(path))


def test_jpeg_missing_only_its_end_marker_is_refused_too(tmp_path):
    path = tmp_path / "no_eoi.jpg"
    data = _noise_jpeg(path)
    assert data.endswith(b"\xff\xd9")
    path.write_bytes(data[:-2])
    with pytest.raises(DataError, match=re.escape(f"cannot read image {path}: image file is truncated")):
        load_image(str(path))


def test_list_file_that_is_not_text_names_file_and_line(tmp_path):
    list_path = tmp_path / "list.txt"
    list_path.write_bytes(b"a/img.jpg 0\n\x89PNG\x00\xff\xfe garbage\n")
    with pytest.raises(DataError, match=re.escape(f"{list_path}, line 2: not UTF-8 text")):
        read_list_file(str(list_path), str(tmp_path))


@pytest.mark.parametrize("content", [b"this is not an image", None])
def test_unreadable_or_missing_image_names_path(tmp_path, content):
    path = tmp_path / "broken.jpg"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(str(path))):
        load_image(str(path))


def test_load_image_converts_to_rgb(tmp_path):
    path = tmp_path / "gray.png"
    Image.fromarray(np.full((5, 7), 128, dtype=np.uint8)).save(path)
    image = load_image(str(path))
    assert image.mode == "RGB" and image.size == (7, 5)


def test_image_list_dataset_returns_tensor_label_index(tmp_path):
    _write_image(tmp_path / "a.png", size=(13, 9))
    _write_image(tmp_path / "b.jpg", size=(8, 20), fmt="JPEG")
    dataset = ImageListDataset([(str(tmp_path / "a.png"), 4), (str(tmp_path / "b.jpg"), 7)],
                               eval_transform(24))
    assert len(dataset) == 2
    image, label, index = dataset[1]
    assert isinstance(image, torch.Tensor) and image.shape == (3, 24, 24)
    assert (label, index) == (7, 1)


def test_eval_transform_normalises_with_imagenet_stats():
    white = Image.new("RGB", (10, 6), (255, 255, 255))
    out = eval_transform(8)(white)
    assert out.shape == (3, 8, 8)
    expected = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(out[:, 0, 0], expected, atol=1e-5)


def test_train_transform_output_shape():
    torch.manual_seed(0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    transform = train_transform(16)
    outs = [transform(image) for _ in range(4)]
    assert all(o.shape == (3, 16, 16) for o in outs)
    assert not torch.equal(outs[0], outs[1]) or not torch.equal(outs[2], outs[3])


# ---------------------------------------------------------------------------------------------
# Training lists.

def test_folder_train_samples_labels_by_sorted_name(image_tree, tmp_path):
    root = image_tree({"zebra": 2, "ant": 1, "mole": 3}, root=tmp_path / "train", size=8)
    samples = folder_train_samples(str(root))
    assert [(Path(p).parent.name, Path(p).name, label) for p, label in samples] == [
        ("ant", "img_000.jpg", 0),
        ("mole", "img_000.jpg", 1), ("mole", "img_001.jpg", 1), ("mole", "img_002.jpg", 1),
        ("zebra", "img_000.jpg", 2), ("zebra", "img_001.jpg", 2)]


def test_folder_train_samples_errors(image_tree, tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "absent")) + ".*<class>/<image>"):
        folder_train_samples(str(tmp_path / "absent"))
    one = image_tree({"only": 2}, root=tmp_path / "one", size=8)
    with pytest.raises(DataError, match="no negative pairs exist"):
        folder_train_samples(str(one))
    two = image_tree({"a": 1}, root=tmp_path / "two", size=8)
    (two / "empty_class").mkdir()
    with pytest.raises(DataError, match=re.escape(str(two / "empty_class")) + ".*no images"):
        folder_train_samples(str(two))
    with pytest.raises(DataError, match="needs train_dir"):
        folder_train_samples(None)


def _imagenet_tree(image_tree, root: Path) -> Path:
    """A 3-class ImageNet-style tree under root; returns the data root."""
    image_tree({str(IMAGENET_TRAIN / wnid): n for wnid, n in
                (("n02", 2), ("n01", 3), ("n03", 1))}, root=root, size=8)
    return root


def test_imagenet_scan_labels_by_sorted_wnid(image_tree, tmp_path):
    root = _imagenet_tree(image_tree, tmp_path / "data")
    samples = imagenet_train_samples(str(root))
    assert [label for _, label in samples] == [0, 0, 0, 1, 1, 2]
    assert samples[3][0] == str(root / IMAGENET_TRAIN / "n02" / "img_000.jpg")


def test_imagenet_cache_reused_then_invalidated(image_tree, tmp_path, monkeypatch):
    root = _imagenet_tree(image_tree, tmp_path / "data")
    cache_dir = tmp_path / "cache"
    first = imagenet_train_samples(str(root), cache_dir=str(cache_dir))
    cache_files = list(cache_dir.iterdir())
    assert len(cache_files) == 1 and cache_files[0].name.endswith(".txt.gz")

    real_scan = train_lists.scan_class_folders
    calls = []

    def failing_scan(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(train_lists, "scan_class_folders", failing_scan)
    assert imagenet_train_samples(str(root), cache_dir=str(cache_dir)) == first

    # Adding an image changes its class folder's mtime; set it explicitly so the test does not
    # depend on the file system's timestamp granularity.
    class_dir = root / IMAGENET_TRAIN / "n03"
    _write_image(class_dir / "img_new.jpg", fmt="JPEG")
    stat = class_dir.stat()
    os.utime(class_dir, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))

    def counting_scan(*args, **kwargs):
        calls.append(args)
        return real_scan(*args, **kwargs)

    monkeypatch.setattr(train_lists, "scan_class_folders", counting_scan)
    updated = imagenet_train_samples(str(root), cache_dir=str(cache_dir))
    assert len(calls) == 1
    assert updated == first + [(str(class_dir / "img_new.jpg"), 2)]
    monkeypatch.setattr(train_lists, "scan_class_folders", failing_scan)
    assert imagenet_train_samples(str(root), cache_dir=str(cache_dir)) == updated
    assert len(list(cache_dir.iterdir())) == 1  # replaced in place, no temp files left


def test_imagenet_corrupt_cache_is_an_error(image_tree, tmp_path):
    root = _imagenet_tree(image_tree, tmp_path / "data")
    cache_dir = tmp_path / "cache"
    imagenet_train_samples(str(root), cache_dir=str(cache_dir))
    (cache_file,) = cache_dir.iterdir()
    with gzip.open(cache_file, "rt") as handle:
        header = handle.readline()
    with gzip.open(cache_file, "wt") as handle:
        handle.write(header + "only_one_name.jpg\n")
    with pytest.raises(DataError, match=re.escape(str(cache_file)) + ".*delete it"):
        imagenet_train_samples(str(root), cache_dir=str(cache_dir))


def test_imagenet_errors(image_tree, tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "none")) + ".*CLS-LOC/train"):
        imagenet_train_samples(str(tmp_path / "none"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="Data/CLS-LOC/train.*does not exist.*<wnid>/<image>"):
        imagenet_train_samples(str(tmp_path / "empty"))
    one = image_tree({str(IMAGENET_TRAIN / "n01"): 1}, root=tmp_path / "one", size=8)
    with pytest.raises(DataError, match="no negative pairs exist"):
        imagenet_train_samples(str(one))


def test_imagenet_from_authors_list(image_tree, tmp_path):
    root = _imagenet_tree(image_tree, tmp_path / "data")
    lists = tmp_path / "lists"
    (lists / "ImageNet").mkdir(parents=True)
    (lists / "ImageNet" / "train.txt").write_text(
        "ImageNet/Data/CLS-LOC/train/n01/img_000.jpg 0\n"
        "ImageNet/Data/CLS-LOC/train/n03/img_000.jpg 2\n")
    samples = imagenet_train_samples(str(root), path_to_txt=str(lists))
    assert samples == [(str(root / IMAGENET_TRAIN / "n01" / "img_000.jpg"), 0),
                       (str(root / IMAGENET_TRAIN / "n03" / "img_000.jpg"), 2)]
    (lists / "ImageNet" / "train.txt").write_text(
        "ImageNet/Data/CLS-LOC/train/n01/img_000.jpg 0\n"
        "ImageNet/Data/CLS-LOC/train/n03/missing.jpg 2\n")
    with pytest.raises(DataError, match=re.escape(str(root / IMAGENET_TRAIN / "n03" /
                                                      "missing.jpg"))):
        imagenet_train_samples(str(root), path_to_txt=str(lists))


def test_train_samples_dispatch(image_tree, tmp_path):
    root = _imagenet_tree(image_tree, tmp_path / "data")
    assert train_samples("ImageNet", str(root)) == imagenet_train_samples(str(root))
    folder = image_tree({"a": 1, "b": 2}, root=tmp_path / "folder", size=8)
    assert [label for _, label in train_samples("Folder", None, train_dir=str(folder))] == [0, 1, 1]
    pacs = image_tree({f"PACS/kfold/{d}/{c}": 1
                       for d in ("art_painting", "cartoon", "photo", "sketch")
                       for c in ("dog", "elephant", "giraffe", "guitar", "horse", "house",
                                 "person")}, root=tmp_path / "pacs", size=8)
    support = train_samples("PACS_SS_DG", str(pacs), target="Sketch")
    assert [label for _, label in support] == [0, 1, 2, 3, 4, 5]
    assert all("/photo/" in path for path, _ in support)
    with pytest.raises(DataError, match="'Nope'.*ImageNet, Folder, PACS_DG"):
        train_samples("Nope", str(root))


def test_load_truncated_images_decodes_them_grey_filled_with_a_warning(tmp_path):
    path = tmp_path / "cut.jpg"
    data = _noise_jpeg(path)
    whole = np.asarray(load_image(str(path))).astype(int)
    path.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.warns(UserWarning, match=re.escape(f"{path} is truncated")):
        cut = np.asarray(load_image(str(path), load_truncated=True)).astype(int)
    assert cut.shape == whole.shape
    # The top rows decode as before, the rows past the cut are Pillow's grey fill.
    assert np.abs(cut[:8] - whole[:8]).mean() < 3
    assert np.abs(cut[-8:] - 128).max() <= 1
    with pytest.raises(DataError, match="truncated"):
        load_image(str(path))


@pytest.mark.parametrize("load_truncated", [True, False], ids=["policy_on", "policy_off"])
def test_truncated_policy_reaches_spawned_dataloader_workers(tmp_path, load_truncated):
    """The policy travels with the dataset (pickled to the worker), not through module state that only
    a forked worker would inherit: spawn is the start method on macOS."""
    path = tmp_path / "cut.jpg"
    data = _noise_jpeg(path)
    path.write_bytes(data[: int(len(data) * 0.6)])
    dataset = ImageListDataset([(str(path), 3)], eval_transform(16), load_truncated=load_truncated)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=1, multiprocessing_context="spawn")
    if load_truncated:
        (images, labels, _), = list(loader)
        assert images.shape == (1, 3, 16, 16) and labels.tolist() == [3]
    else:
        with pytest.raises(DataError, match=re.escape(f"cannot read image {path}: image file is truncated")):
            list(loader)
