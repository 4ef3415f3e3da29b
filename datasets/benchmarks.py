"""Evaluation benchmarks: the class-level protocol of each one and the support/scored lists it yields.

Each benchmark lists, per target, which (domain folder, class folder) pairs form the *support* set
(the known classes whose prototypes are built) and which are *scored* (known and unknown classes of
the target domain). The lists are derived from the folders on disk: every image of each listed
folder, paths sorted, label from the benchmark's label table (labels >= known_classes are unknown).

Exceptions to "every image":
- OfficeHome_DG: the authors' support lists hold a fixed ~90% subsample of each source folder that
  cannot be derived from the folders; we use every image. Use `path_to_txt` for exact reproduction.
- DomainNet_IN_OUT (one target, named `real`): the support side is a train part of each real-domain
  folder of classes 0-24 and the scored side the test part of all 50 classes (the authors' lists hold
  about 70% / 30% of each folder). If `<data_root>/DomainNet/real_train.txt` and `real_test.txt`
  (DomainNet's official split files, lines `real/<class>/<file> <int>`) exist, the train file gives
  the support images and the test file the scored images. Otherwise each folder's sorted images are
  split deterministically: the first round(0.7 n) (halves rounded up) go to the train part, the
  rest to the test part.

With `path_to_txt=DIR` the authors' list files `DIR/<dataset>/<list>.txt` are read instead (lines
`<path relative to list_root()> <label>`; see `list_file_names`). The `Folder` dataset takes a
`source_dir` (one subfolder per known class) and a `target_dir` (one subfolder per class; names not
among the known classes are unknown, labelled after the known ones in sorted order).
"""
import os
from dataclasses import dataclass

from datasets.digits import DIGITS_TARGETS, digits_eval_split, digits_list_file_names
from datasets.image_lists import (IMAGE_EXTENSIONS, DataError, Sample, check_files_exist,
                                  list_images, list_subfolders, read_list_file, read_split_lists)

EVAL_DATASETS = ("PACS_DG", "PACS_SS_DG", "OfficeHome_DG", "OfficeHome_SS_DG", "DomainNet_IN_OUT",
                 "Folder", "Digits")

# Target name used for the Folder dataset when the caller gives none.
FOLDER_DEFAULT_TARGET = "custom"

# Share of each DomainNet folder on the support (train) side when no official split file exists.
DOMAINNET_TRAIN_TENTHS = 7


@dataclass(frozen=True)
class TargetProtocol:
    """Which class folders of which domain folders form the support set and the scored set."""

    source: dict[str, tuple[str, ...]]
    target: dict[str, tuple[str, ...]]


@dataclass(frozen=True)
class Benchmark:
    """A benchmark's folder root (relative to data_root), label table, targets and list names."""

    name: str
    root: str
    known_classes: int
    class_names: tuple[str, ...]
    targets: dict[str, TargetProtocol]
    support_list: str
    scored_list: str
    train_test_split: bool = False

    def layout(self, data_root: str | None = None) -> str:
        """The expected on-disk layout under `data_root`, for error messages."""
        return f"{data_root or '<data_root>'}/{self.root}/<domain>/<class>/<image>"


@dataclass
class EvalSplit:
    """Support and scored samples of one benchmark target; class_names[label] names every label."""

    dataset: str
    target: str
    support: list[Sample]
    scored: list[Sample]
    known_classes: int
    class_names: list[str]


# ---------------------------------------------------------------------------------------------
# Protocol tables (checked against the shared benchmarks.json by tests/test_benchmarks.py).

_PACS_LABELS = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")

_PACS_DG_TARGETS = {
    "ArtPainting": TargetProtocol(
        source={"cartoon": ("dog", "elephant", "guitar"),
                "photo": ("dog", "giraffe", "horse"),
                "sketch": ("elephant", "giraffe", "house")},
        target={"art_painting": _PACS_LABELS}),
    "Cartoon": TargetProtocol(
        source={"art_painting": ("elephant", "giraffe", "house"),
                "photo": ("dog", "giraffe", "horse"),
                "sketch": ("dog", "elephant", "guitar")},
        target={"cartoon": _PACS_LABELS}),
    "Photo": TargetProtocol(
        source={"art_painting": ("dog", "elephant", "guitar"),
                "cartoon": ("dog", "giraffe", "horse"),
                "sketch": ("elephant", "giraffe", "house")},
        target={"photo": _PACS_LABELS}),
    "Sketch": TargetProtocol(
        source={"art_painting": ("dog", "giraffe", "horse"),
                "cartoon": ("elephant", "giraffe", "house"),
                "photo": ("dog", "elephant", "guitar")},
        target={"sketch": _PACS_LABELS}),
}

_PACS_SS_SOURCE = {"photo": _PACS_LABELS[:6]}

_PACS_SS_TARGETS = {
    "ArtPainting": TargetProtocol(source=_PACS_SS_SOURCE, target={"art_painting": _PACS_LABELS}),
    "Cartoon": TargetProtocol(source=_PACS_SS_SOURCE, target={"cartoon": _PACS_LABELS}),
    "Sketch": TargetProtocol(source=_PACS_SS_SOURCE, target={"sketch": _PACS_LABELS}),
}

_OFFICEHOME_DG_LABELS = (
    "Drill", "Exit_Sign", "Bottle", "Glasses", "Computer", "File_Cabinet", "Shelf", "Toys",
    "Sink", "Laptop", "Kettle", "Folder", "Keyboard", "Flipflops", "Pencil", "Bed", "Hammer",
    "ToothBrush", "Couch", "Bike", "Postit_Notes", "Mug", "Webcam", "Desk_Lamp", "Telephone",
    "Helmet", "Mouse", "Pen", "Monitor", "Mop", "Sneakers", "Notebook", "Backpack",
    "Alarm_Clock", "Push_Pin", "Paper_Clip", "Batteries", "Radio", "Fan", "Ruler", "Pan",
    "Screwdriver", "Trash_Can", "Printer", "Speaker", "Eraser", "Bucket", "Chair", "Calendar",
    "Calculator", "Flowers", "Lamp_Shade", "Spoon", "Candles", "Clipboards", "Scissors", "TV",
    "Curtains", "Fork", "Soda", "Table", "Knives", "Oven", "Refrigerator", "Marker",
)

# OfficeHome_DG gives the three source domains of every target (taken in the order Art, Clipart,
# Product, Real_World, skipping the target) these three class groups, in this order.
_OFFICEHOME_DG_SOURCE_GROUPS = (
    ("Drill", "Exit_Sign", "Bottle", "Glasses", "Computer", "File_Cabinet", "Shelf", "Toys",
     "Sink", "Laptop", "Kettle", "Folder", "Keyboard", "Flipflops", "Pencil", "Mug", "Webcam",
     "Desk_Lamp", "Telephone", "Helmet", "Mouse", "Pen", "Monitor", "Mop", "Sneakers",
     "Notebook"),
    ("Drill", "Exit_Sign", "Bottle", "Glasses", "Computer", "File_Cabinet", "Shelf", "Toys",
     "Sink", "Bed", "Hammer", "ToothBrush", "Couch", "Bike", "Postit_Notes", "Backpack",
     "Alarm_Clock", "Push_Pin", "Paper_Clip", "Batteries", "Radio", "Fan", "Ruler", "Pan",
     "Screwdriver", "Trash_Can"),
    ("Drill", "Exit_Sign", "Bottle", "Laptop", "Kettle", "Folder", "Keyboard", "Flipflops",
     "Pencil", "Bed", "Hammer", "ToothBrush", "Couch", "Bike", "Postit_Notes", "Printer",
     "Speaker", "Eraser", "Bucket", "Chair", "Calendar", "Calculator", "Flowers", "Lamp_Shade",
     "Spoon", "Candles"),
)

_OFFICEHOME_DG_TARGET_CLASSES = (
    "Drill", "Glasses", "Computer", "Laptop", "Kettle", "Bed", "Hammer", "Mug", "Webcam",
    "Desk_Lamp", "Backpack", "Alarm_Clock", "Push_Pin", "Printer", "Speaker", "Eraser",
    "Clipboards", "Scissors", "TV", "Curtains", "Fork", "Soda", "Table", "Knives", "Oven",
    "Refrigerator", "Marker",
)

# Target name -> domain folder name (only RealWorld differs).
_OFFICEHOME_DOMAINS = {"Art": "Art", "Clipart": "Clipart", "Product": "Product",
                       "RealWorld": "Real_World"}


def _officehome_dg_target(target_name: str) -> TargetProtocol:
    """The OfficeHome_DG protocol of one target: the other three domains get the source groups."""
    target_domain = _OFFICEHOME_DOMAINS[target_name]
    source_domains = [d for d in _OFFICEHOME_DOMAINS.values() if d != target_domain]
    return TargetProtocol(source=dict(zip(source_domains, _OFFICEHOME_DG_SOURCE_GROUPS)),
                          target={target_domain: _OFFICEHOME_DG_TARGET_CLASSES})


_OFFICEHOME_SS_LABELS = (
    "Alarm_Clock", "Backpack", "Batteries", "Bed", "Bike", "Bottle", "Bucket", "Calculator",
    "Calendar", "Candles", "Chair", "Clipboards", "Computer", "Couch", "Curtains", "Desk_Lamp",
    "Drill", "Eraser", "Exit_Sign", "Fan", "File_Cabinet", "Flipflops", "Flowers", "Folder",
    "Fork", "Glasses", "Hammer", "Helmet", "Kettle", "Keyboard", "Knives", "Lamp_Shade",
    "Laptop", "Marker", "Monitor", "Mop", "Mouse", "Mug", "Notebook", "Oven", "Pan",
    "Paper_Clip", "Pen", "Pencil", "Postit_Notes", "Printer", "Push_Pin", "Radio",
    "Refrigerator", "Ruler", "Scissors", "Screwdriver", "Shelf", "Sink", "Sneakers", "Soda",
    "Speaker", "Spoon", "TV", "Table", "Telephone", "ToothBrush", "Toys", "Trash_Can", "Webcam",
)

_OFFICEHOME_SS_SOURCE = {"Real_World": _OFFICEHOME_SS_LABELS[:25]}

_OFFICEHOME_SS_TARGETS = {
    name: TargetProtocol(source=_OFFICEHOME_SS_SOURCE, target={name: _OFFICEHOME_SS_LABELS})
    for name in ("Art", "Clipart", "Product")
}

_DOMAINNET_LABELS = (
    "circle", "hexagon", "smiley_face", "squiggle", "calendar", "pond", "animal_migration",
    "golf_club", "hurricane", "tornado", "elbow", "knee", "ocean", "rake", "yoga", "zigzag",
    "cloud", "bracelet", "postcard", "stop_sign", "birthday_cake", "cookie", "arm",
    "chandelier", "camouflage", "square", "octagon", "passport", "triangle", "toothpaste",
    "roller_coaster", "snowflake", "skull", "tooth", "saw", "snowman", "ladder", "line",
    "stitches", "string_bean", "donut", "calculator", "campfire", "moon", "sun", "map", "book",
    "steak", "foot", "leg",
)

BENCHMARKS: dict[str, Benchmark] = {
    "PACS_DG": Benchmark(
        name="PACS_DG", root="PACS/kfold", known_classes=6, class_names=_PACS_LABELS,
        targets=_PACS_DG_TARGETS, support_list="no_{target}.txt", scored_list="{target}.txt"),
    "PACS_SS_DG": Benchmark(
        name="PACS_SS_DG", root="PACS/kfold", known_classes=6, class_names=_PACS_LABELS,
        targets=_PACS_SS_TARGETS, support_list="Source.txt", scored_list="{target}.txt"),
    "OfficeHome_DG": Benchmark(
        name="OfficeHome_DG", root="OfficeHome", known_classes=54,
        class_names=_OFFICEHOME_DG_LABELS,
        targets={name: _officehome_dg_target(name) for name in _OFFICEHOME_DOMAINS},
        support_list="no_{target}.txt", scored_list="{target}.txt"),
    "OfficeHome_SS_DG": Benchmark(
        name="OfficeHome_SS_DG", root="OfficeHome", known_classes=25,
        class_names=_OFFICEHOME_SS_LABELS, targets=_OFFICEHOME_SS_TARGETS,
        support_list="Source.txt", scored_list="{target}.txt"),
    "DomainNet_IN_OUT": Benchmark(
        name="DomainNet_IN_OUT", root="DomainNet", known_classes=25,
        class_names=_DOMAINNET_LABELS,
        targets={"real": TargetProtocol(source={"real": _DOMAINNET_LABELS[:25]},
                                        target={"real": _DOMAINNET_LABELS})},
        support_list="in_distribution.txt", scored_list="out_distribution.txt",
        train_test_split=True),
}


# ---------------------------------------------------------------------------------------------
# Names and targets.

def _check_dataset(dataset: str) -> None:
    """Raise DataError listing the valid datasets if `dataset` is not one of them."""
    if dataset not in EVAL_DATASETS:
        raise DataError(f"unknown evaluation dataset {dataset!r}; valid: {', '.join(EVAL_DATASETS)}")


def _benchmark(dataset: str) -> Benchmark:
    """The protocol table of a list-based benchmark (every evaluation dataset except Folder)."""
    _check_dataset(dataset)
    if dataset == "Folder":
        raise DataError("the Folder dataset has no protocol or list files: its lists are the "
                        "source_dir / target_dir folders themselves")
    return BENCHMARKS[dataset]


def dataset_targets(dataset: str) -> list[str]:
    """Valid target names of `dataset` (Folder accepts any name; its default is 'custom')."""
    _check_dataset(dataset)
    if dataset == "Folder":
        return [FOLDER_DEFAULT_TARGET]
    if dataset == "Digits":
        return list(DIGITS_TARGETS)
    return list(BENCHMARKS[dataset].targets)


def resolve_targets(dataset: str, target: str | None) -> list[str]:
    """Targets to evaluate: 'all' -> every target; None -> the only target (error if several)."""
    _check_dataset(dataset)
    if dataset == "Folder":
        return [FOLDER_DEFAULT_TARGET if target in (None, "all") else target]
    valid = dataset_targets(dataset)
    if target == "all":
        return valid
    if target is None:
        if len(valid) == 1:
            return valid
        raise DataError(f"{dataset} has several targets; choose one of {', '.join(valid)} "
                        f"or 'all'")
    if target not in valid:
        raise DataError(f"unknown target {target!r} for {dataset}; valid: {', '.join(valid)}, all")
    return [target]


def list_file_names(dataset: str, target: str) -> tuple[str, str]:
    """(support list name, scored list name) of a benchmark target, as in the authors' lists."""
    if dataset == "Digits":
        return digits_list_file_names(target)
    bench = _benchmark(dataset)
    if target not in bench.targets:
        raise DataError(f"list_file_names needs one target of {dataset}, got {target!r}; "
                        f"valid: {', '.join(bench.targets)}")
    return bench.support_list.format(target=target), bench.scored_list.format(target=target)


def list_root(dataset: str, data_root: str) -> str:
    """The folder that list file paths are relative to (`<data_root>/DomainNet` for DomainNet)."""
    if dataset == "Digits":
        return data_root
    bench = _benchmark(dataset)
    if bench.name == "DomainNet_IN_OUT":
        return os.path.join(data_root, bench.root)
    return data_root


# ---------------------------------------------------------------------------------------------
# Split derivation.

def get_eval_split(dataset: str, target: str | None, data_root: str | None,
                   path_to_txt: str | None = None, source_dir: str | None = None,
                   target_dir: str | None = None) -> EvalSplit:
    """Support and scored samples of one target, from the folders, the authors' lists or Folder."""
    targets = resolve_targets(dataset, target)
    if len(targets) != 1:
        raise DataError(f"get_eval_split needs one target of {dataset}, got {target!r}; "
                        f"iterate over resolve_targets() for several")
    (target,) = targets
    if dataset == "Folder":
        if path_to_txt is not None:
            raise DataError("path_to_txt applies to the benchmarks, not to the Folder dataset")
        return _folder_split(target, source_dir, target_dir)
    if dataset == "Digits":
        return digits_eval_split(target, data_root, path_to_txt)
    bench = BENCHMARKS[dataset]
    if data_root is None:
        raise DataError(f"{dataset} needs a data root; expected {bench.layout()}")
    if not os.path.isdir(data_root):
        raise DataError(f"data root {data_root} does not exist; {dataset} expects "
                        f"{bench.layout(data_root)}")
    if path_to_txt is not None:
        return _split_from_lists(bench, target, data_root, path_to_txt)
    return _split_from_folders(bench, target, data_root)


def _split_from_lists(bench: Benchmark, target: str, data_root: str,
                      path_to_txt: str) -> EvalSplit:
    """Read the authors' support and scored list files of a target."""
    list_paths = [os.path.join(path_to_txt, bench.name, name) for name in list_file_names(bench.name, target)]
    support, scored = read_split_lists(list_paths, list_root(bench.name, data_root), len(bench.class_names),
                                       bench.name)
    return EvalSplit(bench.name, target, support, scored, bench.known_classes,
                     list(bench.class_names))


def _split_from_folders(bench: Benchmark, target: str, data_root: str) -> EvalSplit:
    """Derive the support and scored lists of a target from the benchmark's folders."""
    bench_root = os.path.join(data_root, bench.root)
    if not os.path.isdir(bench_root):
        raise DataError(f"benchmark folder {bench_root} does not exist; {bench.name} expects "
                        f"{bench.layout(data_root)}")
    protocol = bench.targets[target]
    label_of = {name: label for label, name in enumerate(bench.class_names)}
    if bench.train_test_split:
        support_parts = _train_test_parts(bench, bench_root, protocol.source, part=0)
        scored_parts = _train_test_parts(bench, bench_root, protocol.target, part=1)
    else:
        support_parts = _whole_folders(bench, bench_root, protocol.source)
        scored_parts = _whole_folders(bench, bench_root, protocol.target)
    support = sorted((path, label_of[cls]) for (_, cls), paths in support_parts.items()
                     for path in paths)
    scored = sorted((path, label_of[cls]) for (_, cls), paths in scored_parts.items()
                    for path in paths)
    return EvalSplit(bench.name, target, support, scored, bench.known_classes,
                     list(bench.class_names))


def _class_images(bench: Benchmark, bench_root: str, domain: str, cls: str) -> list[str]:
    """All images of one (domain, class) folder; missing or empty folders are errors."""
    folder = os.path.join(bench_root, domain, cls)
    if not os.path.isdir(folder):
        raise DataError(f"class folder {folder} does not exist; {bench.name} expects "
                        f"{bench_root}/<domain>/<class>/<image>")
    return _nonempty_images(folder)


def _whole_folders(bench: Benchmark, bench_root: str,
                   folders: dict[str, tuple[str, ...]]) -> dict[tuple[str, str], list[str]]:
    """(domain, class) -> every image of that folder."""
    return {(domain, cls): _class_images(bench, bench_root, domain, cls)
            for domain, classes in folders.items() for cls in classes}


def _train_test_parts(bench: Benchmark, bench_root: str, folders: dict[str, tuple[str, ...]],
                      part: int) -> dict[tuple[str, str], list[str]]:
    """(domain, class) -> the train (part 0) or test (part 1) images of that folder."""
    result = {}
    for domain, classes in folders.items():
        split_files = [os.path.join(bench_root, f"{domain}_{name}.txt") for name in ("train", "test")]
        present = [os.path.isfile(path) for path in split_files]
        if any(present) and not all(present):
            found, missing = split_files if present[0] else split_files[::-1]
            raise DataError(f"found the split file {found} but not {missing}: the official "
                            f"split needs both (remove {found} to split the folders instead)")
        if all(present):
            per_class = _official_split_part(split_files[part], bench_root, domain, classes)
        else:
            per_class = {cls: _fallback_part(_class_images(bench, bench_root, domain, cls), part)
                         for cls in classes}
        result.update({(domain, cls): paths for cls, paths in per_class.items()})
    return result


def _fallback_part(images: list[str], part: int) -> list[str]:
    """The train (first round(0.7 n), halves up) or test (the rest) part of sorted images."""
    n_train = (DOMAINNET_TRAIN_TENTHS * len(images) + 5) // 10
    return images[:n_train] if part == 0 else images[n_train:]


def _official_split_part(split_file: str, bench_root: str, domain: str,
                         classes: tuple[str, ...]) -> dict[str, list[str]]:
    """class -> sorted images of `classes` listed in an official `<domain>_{train,test}.txt`."""
    wanted = set(classes)
    per_class: dict[str, list[str]] = {cls: [] for cls in classes}
    # The file's own labels index DomainNet's 345 classes; ours come from the class folder name.
    for path, _ in read_list_file(split_file, bench_root):
        parts = os.path.relpath(path, bench_root).split(os.sep)
        if len(parts) != 3 or parts[0] != domain:
            raise DataError(f"{split_file}: entry {path} is not of the form "
                            f"{domain}/<class>/<image>")
        if parts[1] in wanted:
            per_class[parts[1]].append(path)
    empty = [cls for cls, paths in per_class.items() if not paths]
    if empty:
        raise DataError(f"{split_file} lists no images of class folder(s) {', '.join(empty)}")
    check_files_exist([(path, 0) for paths in per_class.values() for path in paths])
    return {cls: sorted(paths) for cls, paths in per_class.items()}


def _folder_split(target: str, source_dir: str | None, target_dir: str | None) -> EvalSplit:
    """Folder dataset: known classes from source_dir subfolders, scored from target_dir."""
    for name, folder in (("source_dir", source_dir), ("target_dir", target_dir)):
        if folder is None:
            raise DataError(f"the Folder dataset needs {name} (<{name}>/<class>/<image>)")
        if not os.path.isdir(folder):
            raise DataError(f"{name} {folder} does not exist; expected {folder}/<class>/<image>")
    known = list_subfolders(source_dir)
    if not known:
        raise DataError(f"source_dir {source_dir} has no class subfolders; expected "
                        f"{source_dir}/<class>/<image>")
    target_classes = list_subfolders(target_dir)
    if not target_classes:
        raise DataError(f"target_dir {target_dir} has no class subfolders; expected "
                        f"{target_dir}/<class>/<image>")
    known_set = set(known)
    class_names = known + sorted(c for c in target_classes if c not in known_set)
    label_of = {name: label for label, name in enumerate(class_names)}
    support = [(path, label_of[cls]) for cls in known
               for path in _nonempty_images(os.path.join(source_dir, cls))]
    scored = [(path, label_of[cls]) for cls in target_classes
              for path in _nonempty_images(os.path.join(target_dir, cls))]
    return EvalSplit("Folder", target, sorted(support), sorted(scored), len(known), class_names)


def _nonempty_images(folder: str) -> list[str]:
    """Images of a class folder; an empty class folder is an error naming it."""
    images = list_images(folder)
    if not images:
        raise DataError(f"class folder {folder} contains no images "
                        f"(extensions {', '.join(IMAGE_EXTENSIONS)})")
    return images
