"""The one protocol type every evaluation benchmark is written in, and the split derivation that reads it.

A `Benchmark` is data: per target, which class folders of which domain folders form the *support*
set (the known classes whose prototypes are built) and which are *scored*, each class's label
(labels >= known_classes are unknown), how a folder's images are taken (all of them, or the train
or test part), the names of the authors' list files, and optional hooks (a check of the tree on
disk). `derive_split` turns a benchmark target into an `EvalSplit` from the folders, or from the
authors' list files with `path_to_txt`. Nothing here branches on a benchmark's name.

Folder parts: with `parts` "train"/"test", a domain's official split files
`<root>/<domain>_train.txt` and `<domain>_test.txt` (lines `<domain>/<class>/<file> <int>`) give the
images when both exist; otherwise each folder's sorted images are split deterministically, the
first round(train_tenths / 10 * n) (halves rounded up) to the train part and the rest to the test part.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Mapping

from datasets.image_lists import (IMAGE_EXTENSIONS, DataError, Sample, check_files_exist, list_images,
                                  list_subfolders, read_list_file, read_split_lists)

PARTS = ("all", "train", "test")


@dataclass(frozen=True)
class TargetProtocol:
    """One target: class folders per domain folder on each side, and the labels of those classes."""

    support: Mapping[str, tuple[str, ...]]
    scored: Mapping[str, tuple[str, ...]]
    class_names: tuple[str, ...]
    known_classes: int

    def __post_init__(self) -> None:
        named = set(self.class_names)
        unnamed = sorted({c for side in (self.support, self.scored) for classes in side.values()
                          for c in classes} - named)
        if unnamed:
            raise ValueError(f"classes {unnamed} have no label in class_names")
        known = set(self.class_names[:self.known_classes])
        unknown_support = sorted({c for classes in self.support.values() for c in classes} - known)
        if unknown_support:
            raise ValueError(f"support classes {unknown_support} are not among the known classes")


@dataclass(frozen=True)
class Benchmark:
    """A benchmark's folder root (under data_root), its targets and how their lists are made.

    `support_list` and `scored_list` are the authors' list file names (`{target}` is replaced), read
    from `<path_to_txt>/<name>/` with paths relative to `<data_root>/<list_root>`. `support_part` and
    `scored_part` say which images of each listed folder are used ("all", "train", "test").
    `check_tree(benchmark_root)` may refuse an incomplete tree before anything is read.
    `train_target`: training on this benchmark uses that target's support set (None: the target
    the user names). `layout_hint` describes the expected tree in error messages. With
    `user_folders`, the classes come from the user's `source_dir` and `target_dir` trees instead of
    `targets` (any target name is accepted; `default_target` when none is given).
    """

    name: str
    root: str
    targets: Mapping[str, TargetProtocol]
    support_list: str
    scored_list: str
    list_root: str = ""
    support_part: str = "all"
    scored_part: str = "all"
    train_tenths: int = 7
    check_tree: Callable[[str], None] | None = None
    train_target: str | None = None
    layout_hint: str = "<domain>/<class>/<image>"
    user_folders: bool = False
    default_target: str | None = None

    def __post_init__(self) -> None:
        for part in (self.support_part, self.scored_part):
            if part not in PARTS:
                raise ValueError(f"{self.name}: part {part!r} is not one of {PARTS}")
        if self.train_target is not None and self.train_target not in self.targets:
            raise ValueError(f"{self.name}: train_target {self.train_target!r} is not a target")

    def layout(self, data_root: str | None = None) -> str:
        """The expected on-disk layout under `data_root`, for error messages."""
        return f"{data_root or '<data_root>'}/{self.root}/{self.layout_hint}"

    def protocol(self, target: str) -> TargetProtocol:
        """The protocol of one target; DataError listing the valid targets."""
        if target not in self.targets:
            raise DataError(f"unknown target {target!r} for {self.name}; valid: {', '.join(self.targets)}, all")
        return self.targets[target]

    def list_file_names(self, target: str) -> tuple[str, str]:
        """(support list name, scored list name) of a target, as in the authors' lists."""
        if target not in self.targets:
            raise DataError(f"list_file_names needs one target of {self.name}, got {target!r}; "
                            f"valid: {', '.join(self.targets)}")
        return self.support_list.format(target=target), self.scored_list.format(target=target)


@dataclass
class EvalSplit:
    """Support and scored samples of one benchmark target; class_names[label] names every label."""

    dataset: str
    target: str
    support: list[Sample]
    scored: list[Sample]
    known_classes: int
    class_names: list[str]


def derive_split(bench: Benchmark, target: str, data_root: str | None, path_to_txt: str | None = None,
                 source_dir: str | None = None, target_dir: str | None = None) -> EvalSplit:
    """Support and scored samples of one target, from the folders or the authors' list files."""
    if bench.user_folders:
        if path_to_txt is not None:
            raise DataError(f"path_to_txt applies to the list-based benchmarks, not to the {bench.name} dataset")
        protocol = folder_protocol(source_dir, target_dir)
        support = _side_samples(bench, "", protocol, protocol.support, bench.support_part)
        scored = _side_samples(bench, "", protocol, protocol.scored, bench.scored_part)
        return EvalSplit(bench.name, target, support, scored, protocol.known_classes, list(protocol.class_names))
    protocol = bench.protocol(target)
    if data_root is None:
        raise DataError(f"{bench.name} needs a data root; expected {bench.layout()}")
    if not os.path.isdir(data_root):
        raise DataError(f"data root {data_root} does not exist; {bench.name} expects {bench.layout(data_root)}")
    if path_to_txt is not None:
        list_paths = [os.path.join(path_to_txt, bench.name, name) for name in bench.list_file_names(target)]
        support, scored = read_split_lists(list_paths, os.path.join(data_root, bench.list_root),
                                           len(protocol.class_names), f"{bench.name}/{target}")
    else:
        bench_root = os.path.join(data_root, bench.root)
        if bench.check_tree is not None:
            bench.check_tree(bench_root)
        elif not os.path.isdir(bench_root):
            raise DataError(f"benchmark folder {bench_root} does not exist; {bench.name} expects "
                            f"{bench.layout(data_root)}")
        support = _side_samples(bench, bench_root, protocol, protocol.support, bench.support_part)
        scored = _side_samples(bench, bench_root, protocol, protocol.scored, bench.scored_part)
    return EvalSplit(bench.name, target, support, scored, protocol.known_classes, list(protocol.class_names))


def folder_protocol(source_dir: str | None, target_dir: str | None) -> TargetProtocol:
    """A protocol from two class-per-subfolder trees: known classes in source_dir, scored in target_dir.

    The domains are the two folders themselves (absolute paths, so they resolve from any root);
    target_dir class names that are not known classes are unknown, labelled after the known ones in
    sorted order.
    """
    for name, folder in (("source_dir", source_dir), ("target_dir", target_dir)):
        if folder is None:
            raise DataError(f"the Folder dataset needs {name} (<{name}>/<class>/<image>)")
        if not os.path.isdir(folder):
            raise DataError(f"{name} {folder} does not exist; expected {folder}/<class>/<image>")
    known = list_subfolders(source_dir)
    if not known:
        raise DataError(f"source_dir {source_dir} has no class subfolders; expected {source_dir}/<class>/<image>")
    scored = list_subfolders(target_dir)
    if not scored:
        raise DataError(f"target_dir {target_dir} has no class subfolders; expected {target_dir}/<class>/<image>")
    class_names = tuple(known) + tuple(sorted(set(scored) - set(known)))
    return TargetProtocol(support={os.path.abspath(source_dir): tuple(known)},
                          scored={os.path.abspath(target_dir): tuple(scored)},
                          class_names=class_names, known_classes=len(known))


def _side_samples(bench: Benchmark, bench_root: str, protocol: TargetProtocol,
                  folders: Mapping[str, tuple[str, ...]], part: str) -> list[Sample]:
    """Sorted (path, label) samples of one side (support or scored) of a target."""
    label_of = {name: label for label, name in enumerate(protocol.class_names)}
    samples: list[Sample] = []
    for domain, classes in folders.items():
        per_class = _domain_images(bench, bench_root, domain, classes, part)
        samples.extend((path, label_of[cls]) for cls in classes for path in per_class[cls])
    return sorted(samples)


def _domain_images(bench: Benchmark, bench_root: str, domain: str, classes: tuple[str, ...],
                   part: str) -> dict[str, list[str]]:
    """class -> the images of `<bench_root>/<domain>/<class>` in the given part."""
    if part == "all":
        return {cls: class_images(bench, bench_root, domain, cls) for cls in classes}
    split_files = [os.path.join(bench_root, f"{domain}_{name}.txt") for name in ("train", "test")]
    present = [os.path.isfile(path) for path in split_files]
    if any(present) and not all(present):
        found, missing = split_files if present[0] else split_files[::-1]
        raise DataError(f"found the split file {found} but not {missing}: the official "
                        f"split needs both (remove {found} to split the folders instead)")
    if all(present):
        return _official_split_part(split_files[PARTS.index(part) - 1], bench_root, domain, classes)
    return {cls: _fallback_part(class_images(bench, bench_root, domain, cls), part, bench.train_tenths)
            for cls in classes}


def class_images(bench: Benchmark, bench_root: str, domain: str, cls: str) -> list[str]:
    """All images of one (domain, class) folder; missing or empty folders are errors naming them."""
    folder = os.path.join(bench_root, domain, cls)
    if not os.path.isdir(folder):
        raise DataError(f"class folder {folder} does not exist; {bench.name} expects "
                        f"{bench_root}/{bench.layout_hint}")
    return nonempty_images(folder)


def nonempty_images(folder: str) -> list[str]:
    """Images of a class folder; an empty class folder is an error naming it."""
    images = list_images(folder)
    if not images:
        raise DataError(f"class folder {folder} contains no images (extensions {', '.join(IMAGE_EXTENSIONS)})")
    return images


def _fallback_part(images: list[str], part: str, train_tenths: int) -> list[str]:
    """The train (first round(train_tenths / 10 * n), halves up) or test (the rest) part of sorted images."""
    n_train = (train_tenths * len(images) + 5) // 10
    return images[:n_train] if part == "train" else images[n_train:]


def _official_split_part(split_file: str, bench_root: str, domain: str,
                         classes: tuple[str, ...]) -> dict[str, list[str]]:
    """class -> sorted images of `classes` listed in an official `<domain>_{train,test}.txt`."""
    wanted = set(classes)
    per_class: dict[str, list[str]] = {cls: [] for cls in classes}
    # The file's own labels index the data set's full class list; ours come from the folder name.
    for path, _ in read_list_file(split_file, bench_root):
        parts = os.path.relpath(path, bench_root).split(os.sep)
        if len(parts) != 3 or parts[0] != domain:
            raise DataError(f"{split_file}: entry {path} is not of the form {domain}/<class>/<image>")
        if parts[1] in wanted:
            per_class[parts[1]].append(path)
    empty = [cls for cls, paths in per_class.items() if not paths]
    if empty:
        raise DataError(f"{split_file} lists no images of class folder(s) {', '.join(empty)}")
    check_files_exist([(path, 0) for paths in per_class.values() for path in paths])
    return {cls: sorted(paths) for cls, paths in per_class.items()}
