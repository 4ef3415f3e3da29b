"""The benchmark table: every evaluation data set as a `datasets.protocol.Benchmark` row.

Code reads this table and never branches on a benchmark's name: `train.py`'s choices, the training
lists (`datasets.train_lists`), the export (`datasets.export_lists`) and the evaluation all go
through `BENCHMARKS` and the functions below. A new benchmark is one `Benchmark(...)` added with
`register_benchmark` (see tests/test_benchmarks.py for one added from a test).

Notes on individual rows:
- OfficeHome_DG: the authors' support lists hold a fixed ~90% subsample of each source folder that
  cannot be derived from the folders; we use every image. Use `path_to_txt` for exact reproduction.
- DomainNet_IN_OUT (one target, named `real`): the support side is the train part of each real-domain
  folder of classes 0-24 and the scored side the test part of all 50 classes (the authors' lists hold
  about 70% / 30% of each folder); DomainNet's official `real_train.txt` / `real_test.txt` give the
  parts when present (see `datasets.protocol`). Its list paths are relative to `<data_root>/DomainNet`.
- Digits: the embedded demo's benchmark (`datasets.digits`).
- Folder: the user's own data, `source_dir` (one subfolder per known class) and `target_dir` (one
  subfolder per class; names that are not known classes are unknown, labelled after the known ones
  in sorted order).

With `path_to_txt=DIR` the authors' list files `DIR/<dataset>/<list>.txt` are read instead (lines
`<path relative to list_root()> <label>`; see `list_file_names`).
"""
import os

from datasets.digits import DIGITS
from datasets.image_lists import DataError
from datasets.protocol import Benchmark, EvalSplit, TargetProtocol, derive_split

# Target name used for the Folder dataset when the caller gives none.
FOLDER_DEFAULT_TARGET = "custom"


# ---------------------------------------------------------------------------------------------
# Protocol tables (checked against tests/data/benchmarks.json by tests/test_benchmarks.py).

_PACS_LABELS = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")


def _pacs(source: dict[str, tuple[str, ...]], target: dict[str, tuple[str, ...]]) -> TargetProtocol:
    """A PACS target: the first six labels are the known classes."""
    return TargetProtocol(support=source, scored=target, class_names=_PACS_LABELS, known_classes=6)


_PACS_DG_TARGETS = {
    "ArtPainting": _pacs(
        source={"cartoon": ("dog", "elephant", "guitar"),
                "photo": ("dog", "giraffe", "horse"),
                "sketch": ("elephant", "giraffe", "house")},
        target={"art_painting": _PACS_LABELS}),
    "Cartoon": _pacs(
        source={"art_painting": ("elephant", "giraffe", "house"),
                "photo": ("dog", "giraffe", "horse"),
                "sketch": ("dog", "elephant", "guitar")},
        target={"cartoon": _PACS_LABELS}),
    "Photo": _pacs(
        source={"art_painting": ("dog", "elephant", "guitar"),
                "cartoon": ("dog", "giraffe", "horse"),
                "sketch": ("elephant", "giraffe", "house")},
        target={"photo": _PACS_LABELS}),
    "Sketch": _pacs(
        source={"art_painting": ("dog", "giraffe", "horse"),
                "cartoon": ("elephant", "giraffe", "house"),
                "photo": ("dog", "elephant", "guitar")},
        target={"sketch": _PACS_LABELS}),
}

_PACS_SS_SOURCE = {"photo": _PACS_LABELS[:6]}

_PACS_SS_TARGETS = {
    "ArtPainting": _pacs(source=_PACS_SS_SOURCE, target={"art_painting": _PACS_LABELS}),
    "Cartoon": _pacs(source=_PACS_SS_SOURCE, target={"cartoon": _PACS_LABELS}),
    "Sketch": _pacs(source=_PACS_SS_SOURCE, target={"sketch": _PACS_LABELS}),
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
    return TargetProtocol(support=dict(zip(source_domains, _OFFICEHOME_DG_SOURCE_GROUPS)),
                          scored={target_domain: _OFFICEHOME_DG_TARGET_CLASSES},
                          class_names=_OFFICEHOME_DG_LABELS, known_classes=54)


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
    name: TargetProtocol(support=_OFFICEHOME_SS_SOURCE, scored={name: _OFFICEHOME_SS_LABELS},
                         class_names=_OFFICEHOME_SS_LABELS, known_classes=25)
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

BENCHMARKS: dict[str, Benchmark] = {}
"""Every evaluation data set by name, in the order `--dataset` lists them."""


def register_benchmark(bench: Benchmark) -> Benchmark:
    """Add a benchmark row to the table (a duplicate name is an error); returns it."""
    if bench.name in BENCHMARKS:
        raise ValueError(f"benchmark {bench.name!r} is already registered")
    BENCHMARKS[bench.name] = bench
    return bench


for _row in (
    Benchmark(name="PACS_DG", root="PACS/kfold", targets=_PACS_DG_TARGETS,
              support_list="no_{target}.txt", scored_list="{target}.txt"),
    Benchmark(name="PACS_SS_DG", root="PACS/kfold", targets=_PACS_SS_TARGETS,
              support_list="Source.txt", scored_list="{target}.txt"),
    Benchmark(name="OfficeHome_DG", root="OfficeHome",
              targets={name: _officehome_dg_target(name) for name in _OFFICEHOME_DOMAINS},
              support_list="no_{target}.txt", scored_list="{target}.txt"),
    Benchmark(name="OfficeHome_SS_DG", root="OfficeHome", targets=_OFFICEHOME_SS_TARGETS,
              support_list="Source.txt", scored_list="{target}.txt"),
    Benchmark(name="DomainNet_IN_OUT", root="DomainNet",
              targets={"real": TargetProtocol(support={"real": _DOMAINNET_LABELS[:25]},
                                              scored={"real": _DOMAINNET_LABELS},
                                              class_names=_DOMAINNET_LABELS, known_classes=25)},
              support_list="in_distribution.txt", scored_list="out_distribution.txt",
              list_root="DomainNet", support_part="train", scored_part="test"),
    Benchmark(name="Folder", root="", targets={}, support_list="", scored_list="", user_folders=True,
              default_target=FOLDER_DEFAULT_TARGET),
    DIGITS,
):
    register_benchmark(_row)


# ---------------------------------------------------------------------------------------------
# Names and targets.

def benchmark_names() -> list[str]:
    """Every registered benchmark name."""
    return list(BENCHMARKS)


def benchmark(dataset: str) -> Benchmark:
    """The table row of `dataset`; DataError listing the valid names."""
    if dataset not in BENCHMARKS:
        raise DataError(f"unknown evaluation dataset {dataset!r}; valid: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[dataset]


def _list_based(dataset: str) -> Benchmark:
    """The row of a benchmark with a protocol and list files (all but user-folder ones)."""
    bench = benchmark(dataset)
    if bench.user_folders:
        raise DataError(f"the {dataset} dataset has no protocol or list files: its lists are the "
                        "source_dir / target_dir folders themselves")
    return bench


def dataset_targets(dataset: str) -> list[str]:
    """Valid target names of `dataset` (a user-folder dataset accepts any name; its default is listed)."""
    bench = benchmark(dataset)
    return [bench.default_target] if bench.user_folders else list(bench.targets)


def resolve_targets(dataset: str, target: str | None) -> list[str]:
    """Targets to evaluate: 'all' -> every target; None -> the only target (error if several)."""
    bench = benchmark(dataset)
    if bench.user_folders:
        return [bench.default_target if target in (None, "all") else target]
    valid = list(bench.targets)
    if target == "all":
        return valid
    if target is None:
        if len(valid) == 1:
            return valid
        raise DataError(f"{dataset} has several targets; choose one of {', '.join(valid)} or 'all'")
    bench.protocol(target)  # DataError naming the valid targets
    return [target]


def list_file_names(dataset: str, target: str) -> tuple[str, str]:
    """(support list name, scored list name) of a benchmark target, as in the authors' lists."""
    return _list_based(dataset).list_file_names(target)


def list_root(dataset: str, data_root: str) -> str:
    """The folder that list file paths are relative to (`<data_root>/DomainNet` for DomainNet)."""
    sub_folder = _list_based(dataset).list_root
    return os.path.join(data_root, sub_folder) if sub_folder else data_root


def get_eval_split(dataset: str, target: str | None, data_root: str | None,
                   path_to_txt: str | None = None, source_dir: str | None = None,
                   target_dir: str | None = None) -> EvalSplit:
    """Support and scored samples of one target, from the folders, the authors' lists or user folders."""
    targets = resolve_targets(dataset, target)
    if len(targets) != 1:
        raise DataError(f"get_eval_split needs one target of {dataset}, got {target!r}; "
                        f"iterate over resolve_targets() for several")
    return derive_split(benchmark(dataset), targets[0], data_root, path_to_txt, source_dir, target_dir)
