"""Training image lists: ImageNet (scanned once, then cached), a class-per-folder tree, or a benchmark.

`TRAINING_SETS` is the one table of training data set names: ImageNet, Folder (`train_dir`) and
every list-based benchmark of `datasets.benchmarks`, whose training set is the support set of a
target (the benchmark's fixed `train_target`, e.g. Digits' `seen`, or the `--target` the user names).

The ImageNet scan (1.28M files) is slow on network disks, so with `cache_dir` the scanned list is
stored as gzip text (`imagenet_train_<root hash>.txt.gz`: a JSON header line, then one file name per
line, class after class) and reused while the tree is unchanged. The cache key is the resolved
root path, the sorted class folder names and each class folder's mtime_ns: adding or removing an
image changes its folder's mtime and so invalidates the cache.
"""
import gzip
import hashlib
import json
import os

from datasets.benchmarks import BENCHMARKS, get_eval_split
from datasets.image_lists import (IMAGE_EXTENSIONS, DataError, Sample, check_files_exist,
                                  list_images, list_subfolders, read_list_file)
from utils.atomic_files import atomic_open
from utils.progress import progress

IMAGENET_TRAIN_SUBDIR = os.path.join("ImageNet", "Data", "CLS-LOC", "train")
IMAGENET_LAYOUT = "<data_root>/ImageNet/Data/CLS-LOC/train/<wnid>/<image>"
# The periodic evaluation the authors run while training on a data set (train.py's default).
DEFAULT_EVAL_DATASET = {"ImageNet": "DomainNet_IN_OUT"}

_CACHE_FORMAT = "resend-train-list-cache"
_CACHE_VERSION = 1


def scan_class_folders(root: str, class_names: list[str]) -> list[Sample]:
    """Every image of `root/<class>` for each class, labelled by its index in `class_names`."""
    samples: list[Sample] = []
    for label, cls in enumerate(progress(class_names, total=len(class_names), desc=f"scanning {root}",
                                         unit="class")):
        folder = os.path.join(root, cls)
        images = list_images(folder)
        if not images:
            raise DataError(f"class folder {folder} contains no images "
                            f"(extensions {', '.join(IMAGE_EXTENSIONS)})")
        samples.extend((path, label) for path in images)
    return samples


def _class_folder_names(root: str, layout: str) -> list[str]:
    """Sorted class folder names under `root`; at least two are needed to form negative pairs."""
    if not os.path.isdir(root):
        raise DataError(f"training folder {root} does not exist; expected {layout}")
    classes = list_subfolders(root)
    _require_two_classes(len(classes), f"{root} (class folders: {', '.join(classes) or 'none'}; "
                                       f"expected {layout})")
    return classes


def _require_two_classes(n_classes: int, where: str) -> None:
    """Raise DataError unless there are at least two classes."""
    if n_classes < 2:
        raise DataError(f"training needs at least two classes, found {n_classes} in {where}: "
                        f"with fewer, no negative pairs exist")


def folder_train_samples(train_dir: str | None) -> list[Sample]:
    """Images of `train_dir/<class>/<image>`, labels by sorted class folder name."""
    if train_dir is None:
        raise DataError("the Folder training dataset needs train_dir (<train_dir>/<class>/<image>)")
    classes = _class_folder_names(train_dir, f"{train_dir}/<class>/<image>")
    return scan_class_folders(train_dir, classes)


def imagenet_train_samples(data_root: str, path_to_txt: str | None = None,
                           cache_dir: str | None = None) -> list[Sample]:
    """ImageNet training images from the folder tree (cached in cache_dir) or the authors' list."""
    if not os.path.isdir(data_root):
        raise DataError(f"data root {data_root} does not exist; ImageNet training expects "
                        f"{IMAGENET_LAYOUT}")
    if path_to_txt is not None:
        return _imagenet_from_list(os.path.join(path_to_txt, "ImageNet", "train.txt"), data_root)
    train_dir = os.path.abspath(os.path.join(data_root, IMAGENET_TRAIN_SUBDIR))
    classes = _class_folder_names(train_dir, IMAGENET_LAYOUT)
    if cache_dir is None:
        return scan_class_folders(train_dir, classes)
    key = _tree_key(train_dir, classes)
    root_hash = hashlib.sha256(os.path.realpath(train_dir).encode()).hexdigest()[:16]
    cache_path = os.path.join(cache_dir, f"imagenet_train_{root_hash}.txt.gz")
    cached = _read_cache(cache_path, key, train_dir)
    if cached is not None:
        return cached
    samples = scan_class_folders(train_dir, classes)
    _write_cache(cache_path, key, train_dir, classes, samples)
    return samples


def _imagenet_from_list(list_path: str, data_root: str) -> list[Sample]:
    """The authors' `ImageNet/train.txt` (`<path relative to data root> <label>`), checked."""
    samples = read_list_file(list_path, data_root)
    _require_two_classes(len({label for _, label in samples}), list_path)
    check_files_exist(samples)
    return samples


def _tree_key(train_dir: str, classes: list[str]) -> str:
    """Digest identifying the tree's state: resolved root, class names, class folder mtimes."""
    state = {
        "version": _CACHE_VERSION,
        "root": os.path.realpath(train_dir),
        "classes": [[cls, os.stat(os.path.join(train_dir, cls)).st_mtime_ns] for cls in classes],
    }
    return hashlib.sha256(json.dumps(state).encode()).hexdigest()


def _read_cache(cache_path: str, key: str, train_dir: str) -> list[Sample] | None:
    """Samples from a cache file whose key matches; None if absent or stale."""
    if not os.path.isfile(cache_path):
        return None
    try:
        with gzip.open(cache_path, "rt", encoding="utf-8", newline="\n") as handle:
            header = json.loads(handle.readline())
            if not isinstance(header, dict) or header.get("format") != _CACHE_FORMAT:
                raise ValueError(f"not a {_CACHE_FORMAT} file")
            if header.get("key") != key:
                return None
            names = handle.read().split("\n")[:-1]
    except (OSError, EOFError, ValueError) as error:
        raise DataError(f"training list cache {cache_path} is unreadable ({error}); "
                        f"delete it to rescan") from error
    classes, counts = header["classes"], header["counts"]
    if sum(counts) != len(names) or len(classes) != len(counts):
        raise DataError(f"training list cache {cache_path} is inconsistent ({len(names)} names, "
                        f"counts sum to {sum(counts)}); delete it to rescan")
    samples: list[Sample] = []
    start = 0
    for label, (cls, count) in enumerate(zip(classes, counts)):
        folder = os.path.join(train_dir, cls)
        samples.extend((os.path.join(folder, name), label) for name in names[start:start + count])
        start += count
    return samples


def _write_cache(cache_path: str, key: str, train_dir: str, classes: list[str],
                 samples: list[Sample]) -> None:
    """Store the scanned samples compactly (file names only), atomically."""
    counts = [0] * len(classes)
    names = []
    for path, label in samples:
        name = os.path.basename(path)
        if "\n" in name:
            raise DataError(f"cannot cache the training list: file name {path!r} contains a "
                            f"newline; rename it or run without a cache_dir")
        counts[label] += 1
        names.append(name)
    header = {"format": _CACHE_FORMAT, "version": _CACHE_VERSION, "key": key,
              "root": os.path.realpath(train_dir), "classes": classes, "counts": counts}
    payload = json.dumps(header) + "\n" + "".join(name + "\n" for name in names)
    with atomic_open(cache_path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb") as out:
        out.write(payload.encode("utf-8"))


def _imagenet_reader(data_root: str | None, path_to_txt: str | None, train_dir: str | None,
                     cache_dir: str | None, target: str | None) -> list[Sample]:
    """ImageNet from `data_root` (scanned, cached) or the authors' list."""
    if data_root is None:
        raise DataError(f"ImageNet training needs data_root ({IMAGENET_LAYOUT})")
    return imagenet_train_samples(data_root, path_to_txt, cache_dir)


def _folder_reader(data_root: str | None, path_to_txt: str | None, train_dir: str | None,
                   cache_dir: str | None, target: str | None) -> list[Sample]:
    """A class-per-folder tree at `train_dir`."""
    return folder_train_samples(train_dir)


# Training sets that are not evaluation benchmarks; every list-based benchmark is one as well.
_OWN_TRAINING_SETS = {"ImageNet": _imagenet_reader, "Folder": _folder_reader}


def training_set_names() -> list[str]:
    """Every data set `train_samples` accepts: ImageNet, Folder and the list-based benchmarks."""
    return list(_OWN_TRAINING_SETS) + [name for name, bench in BENCHMARKS.items()
                                       if not bench.user_folders and name not in _OWN_TRAINING_SETS]


def training_uses_target(dataset: str) -> bool:
    """Whether `--target` chooses the training set of `dataset` (a benchmark without a fixed train target)."""
    if dataset in _OWN_TRAINING_SETS:
        return False
    bench = BENCHMARKS.get(dataset)
    return bench is not None and not bench.user_folders and bench.train_target is None


def train_samples(dataset: str, data_root: str | None, path_to_txt: str | None = None,
                  train_dir: str | None = None, cache_dir: str | None = None,
                  target: str | None = None) -> list[Sample]:
    """Training samples of `dataset`: ImageNet, a Folder tree, or a benchmark target's support set."""
    if dataset in _OWN_TRAINING_SETS:
        return _OWN_TRAINING_SETS[dataset](data_root, path_to_txt, train_dir, cache_dir, target)
    if dataset not in training_set_names():
        raise DataError(f"unknown training dataset {dataset!r}; valid: {', '.join(training_set_names())}")
    # A benchmark trains on the support set of its fixed training target or of the one named.
    bench = BENCHMARKS[dataset]
    return get_eval_split(dataset, bench.train_target or target, data_root, path_to_txt).support
