"""Digits: scikit-learn's bundled handwritten digits as a small image-folder novelty benchmark.

`sklearn.datasets.load_digits` ships 1797 real 8x8 grey images of the digits 0-9 (values 0..16)
inside the package, so this benchmark needs no download. `prepare_digits` writes them once as
32x32 RGB PNGs (values scaled by 255/16 and rounded; each source pixel becomes a 4x4 block, i.e.
nearest-neighbour upsampling, which keeps the files exact and independent of any resampling code;
the grey value is copied to R, G and B) into

    <data_root>/Digits/train/<d>/<index>.png          70% of each digit 0-4 (training, seen support)
    <data_root>/Digits/heldout/<d>/<index>.png        the other 30% of each digit 0-4
    <data_root>/Digits/novel_support/<d>/<index>.png  half of each digit 5-7 (rounded up)
    <data_root>/Digits/novel_query/<d>/<index>.png    the other half of 5-7, and all of 8 and 9
    <data_root>/Digits/manifest.json                  written last: marks the tree complete

`<index>` is the image's 4-digit index in `load_digits()`. Each image file is written once. The
split of a digit's images is fixed: they are ordered by the SHA-256 of `"<seed>:<index>"` (seed
DIGITS_SPLIT_SEED), which unlike a random generator cannot change between library versions; the
first round(0.7 n) (halves rounded up) go to `train`, the first ceil(n / 2) to `novel_support`.

Two targets:
- `seen`: support = `train/0-4` (labels 0-4); scored = `heldout/0-4` (known, labels 0-4) and every
  image of 5-9 (`novel_support/5-7` + `novel_query/5-9`; unknown, labels 5-9). 5 known classes.
- `novel` (classes never trained on): support = `novel_support/5-7` (labels 0-2 for 5, 6, 7);
  scored = `novel_query/5-9` (labels 0-2 known, 3-4 for the unknown 8 and 9). 3 known classes.

With `path_to_txt=DIR`, the lists `DIR/Digits/<target>_support.txt` and `DIR/Digits/<target>.txt`
are read instead (lines `<path relative to data_root> <label>`, e.g. `Digits/train/0/0000.png 0`).
The protocol is the `DIGITS` Benchmark at the end of this module; `datasets.benchmarks` lists it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile

import numpy as np
from PIL import Image

from datasets.image_lists import DataError, list_images
from datasets.protocol import Benchmark, TargetProtocol

DIGITS_DATASET = "Digits"
DIGITS_SPLIT_SEED = 0
DIGITS_IMAGE_SIZE = 32
MANIFEST_FILE = "manifest.json"

_MANIFEST_FORMAT = "resend-digits"
_MANIFEST_VERSION = 1
_SOURCE_SIZE = 8
_SOURCE_MAX = 16.0
_TRAIN_TENTHS = 7
_SEEN_DIGITS = (0, 1, 2, 3, 4)
_NOVEL_KNOWN_DIGITS = (5, 6, 7)
_NOVEL_UNKNOWN_DIGITS = (8, 9)
_ALL_NOVEL = _NOVEL_KNOWN_DIGITS + _NOVEL_UNKNOWN_DIGITS


def _names(digits: tuple[int, ...]) -> tuple[str, ...]:
    """Class folder names of digits."""
    return tuple(str(d) for d in digits)


def _folders(split: str, digits: tuple[int, ...]) -> tuple[str, ...]:
    """`<split>/<digit>` folder names."""
    return tuple(f"{split}/{digit}" for digit in digits)


# Every class folder of the tree, in the order they are written and recorded in the manifest.
_ALL_FOLDERS = (_folders("train", _SEEN_DIGITS) + _folders("heldout", _SEEN_DIGITS)
                + _folders("novel_support", _NOVEL_KNOWN_DIGITS) + _folders("novel_query", _ALL_NOVEL))


# ---------------------------------------------------------------------------------------------
# Preparation.

def digits_root(data_root: str) -> str:
    """The folder the Digits tree lives in: `<data_root>/Digits`."""
    return os.path.join(os.path.abspath(data_root), DIGITS_DATASET)


def _split_order(indices: np.ndarray, seed: int) -> list[int]:
    """`indices` in a fixed pseudo-random order that depends only on the seed and the indices."""
    return sorted((int(i) for i in indices),
                  key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())


def assign_folders(targets: np.ndarray, seed: int = DIGITS_SPLIT_SEED) -> dict[str, list[int]]:
    """Indices of the images going to each `<split>/<digit>` folder, from the digit labels."""
    assignment: dict[str, list[int]] = {folder: [] for folder in _ALL_FOLDERS}
    for digit in range(10):
        order = _split_order(np.flatnonzero(targets == digit), seed)
        if digit in _SEEN_DIGITS:
            n_train = (_TRAIN_TENTHS * len(order) + 5) // 10
            assignment[f"train/{digit}"] = sorted(order[:n_train])
            assignment[f"heldout/{digit}"] = sorted(order[n_train:])
        elif digit in _NOVEL_KNOWN_DIGITS:
            n_support = (len(order) + 1) // 2
            assignment[f"novel_support/{digit}"] = sorted(order[:n_support])
            assignment[f"novel_query/{digit}"] = sorted(order[n_support:])
        else:
            assignment[f"novel_query/{digit}"] = sorted(order)
    return assignment


def to_rgb_image(grey: np.ndarray, size: int = DIGITS_IMAGE_SIZE) -> Image.Image:
    """An 8x8 array of 0..16 as a size x size RGB image (values * 255/16, nearest upsampling)."""
    if grey.shape != (_SOURCE_SIZE, _SOURCE_SIZE) or size % _SOURCE_SIZE:
        raise ValueError(f"expected an 8x8 digit and a size that is a multiple of 8, got shape "
                         f"{grey.shape} and size {size}")
    scaled = np.rint(np.asarray(grey, dtype=np.float64) * (255.0 / _SOURCE_MAX))
    pixels = np.clip(scaled, 0, 255).astype(np.uint8)
    factor = size // _SOURCE_SIZE
    pixels = np.repeat(np.repeat(pixels, factor, axis=0), factor, axis=1)
    return Image.fromarray(np.stack([pixels] * 3, axis=-1), mode="RGB")


def _save_png(image: Image.Image, path: str) -> None:
    """Write one PNG (a separate function so that tests can interrupt the preparation)."""
    image.save(path, format="PNG")


def _expected_manifest(counts: dict[str, int]) -> dict:
    """The manifest describing a complete tree with these per-folder image counts."""
    return {"format": _MANIFEST_FORMAT, "version": _MANIFEST_VERSION, "seed": DIGITS_SPLIT_SEED,
            "image_size": DIGITS_IMAGE_SIZE, "upsampling": "nearest", "counts": counts,
            "total": sum(counts.values())}


def _read_manifest(root: str) -> dict:
    """The manifest of a Digits tree; DataError if the tree or its manifest is missing or bad."""
    path = os.path.join(root, MANIFEST_FILE)
    if not os.path.isfile(path):
        if os.path.isdir(root):
            raise DataError(f"{root} exists but has no {MANIFEST_FILE}, so it is not a complete "
                            f"Digits tree; delete it and run prepare_digits again")
        data_root = os.path.dirname(root)
        raise DataError(f"the Digits tree {root} does not exist; create it with "
                        f"datasets.digits.prepare_digits({data_root!r}) or `python train.py --demo`")
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read the Digits manifest {path}: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != _MANIFEST_FORMAT \
            or manifest.get("version") != _MANIFEST_VERSION:
        raise DataError(f"{path} is not a version {_MANIFEST_VERSION} {_MANIFEST_FORMAT} manifest; "
                        f"delete {root} and run prepare_digits again")
    return manifest


def _check_tree(root: str) -> dict:
    """The manifest of a complete tree whose folders hold exactly the recorded image counts."""
    manifest = _read_manifest(root)
    counts = manifest.get("counts")
    if not isinstance(counts, dict) or sorted(counts) != sorted(_ALL_FOLDERS):
        raise DataError(f"{os.path.join(root, MANIFEST_FILE)} lists folders {counts!r}, expected "
                        f"{', '.join(_ALL_FOLDERS)}; delete {root} and run prepare_digits again")
    for folder, expected in counts.items():
        found = len(list_images(os.path.join(root, folder)))
        if found != expected:
            raise DataError(f"{os.path.join(root, folder)} holds {found} images, its manifest says "
                            f"{expected}; delete {root} and run prepare_digits again")
    return manifest


def prepare_digits(data_root: str) -> str:
    """Write the Digits tree under `data_root` unless it is already complete; return its path."""
    root = digits_root(data_root)
    if os.path.exists(root):
        _check_tree(root)
        return root
    from sklearn.datasets import load_digits  # a heavy import, needed only on the first call

    digits = load_digits()
    assignment = assign_folders(digits.target)
    os.makedirs(os.path.dirname(root), exist_ok=True)
    # Build the tree under a temporary name and rename it into place, so that an interrupted
    # preparation never leaves a partial `Digits` folder behind.
    temp_root = tempfile.mkdtemp(dir=os.path.dirname(root), prefix=f".{DIGITS_DATASET}.tmp_")
    try:
        # mkdtemp makes a private (0700) folder; the finished tree is shared data like any other.
        os.chmod(temp_root, 0o755)
        for folder in _ALL_FOLDERS:
            os.makedirs(os.path.join(temp_root, folder))
            for index in assignment[folder]:
                _save_png(to_rgb_image(digits.images[index]),
                          os.path.join(temp_root, folder, f"{index:04d}.png"))
        manifest = _expected_manifest({folder: len(assignment[folder]) for folder in _ALL_FOLDERS})
        with open(os.path.join(temp_root, MANIFEST_FILE), "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2)
            handle.write("\n")
        try:
            os.replace(temp_root, root)
        except OSError:
            # Another process (e.g. another rank) finished first: keep its identical tree.
            if not os.path.isfile(os.path.join(root, MANIFEST_FILE)):
                raise
            _check_tree(root)
            shutil.rmtree(temp_root)
    except BaseException:
        shutil.rmtree(temp_root, ignore_errors=True)
        raise
    return root


# ---------------------------------------------------------------------------------------------
# The protocol.

def check_digits_tree(root: str) -> None:
    """Refuse a missing or incomplete tree (its manifest is written last), naming how to make it."""
    _read_manifest(root)


DIGITS = Benchmark(
    name=DIGITS_DATASET, root=DIGITS_DATASET,
    targets={
        "seen": TargetProtocol(
            support={"train": _names(_SEEN_DIGITS)},
            scored={"heldout": _names(_SEEN_DIGITS), "novel_support": _names(_NOVEL_KNOWN_DIGITS),
                    "novel_query": _names(_ALL_NOVEL)},
            class_names=_names(_SEEN_DIGITS + _ALL_NOVEL), known_classes=len(_SEEN_DIGITS)),
        "novel": TargetProtocol(
            support={"novel_support": _names(_NOVEL_KNOWN_DIGITS)},
            scored={"novel_query": _names(_ALL_NOVEL)},
            class_names=_names(_ALL_NOVEL), known_classes=len(_NOVEL_KNOWN_DIGITS)),
    },
    support_list="{target}_support.txt", scored_list="{target}.txt",
    check_tree=check_digits_tree, train_target="seen", layout_hint="<split>/<digit>/<image>")
"""The Digits benchmark; training on Digits uses the `seen` target's support set (digits 0-4)."""


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: `python -m datasets.digits --data_root R`."""
    parser = argparse.ArgumentParser(description="Write the Digits benchmark tree (once).")
    parser.add_argument("--data_root", required=True)
    args = parser.parse_args(argv)
    print(prepare_digits(args.data_root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
