"""Tests for the benchmark protocol tables, split derivation, list files and export_lists."""
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from datasets.benchmarks import (BENCHMARKS, Benchmark, TargetProtocol, benchmark_names, dataset_targets,
                                 get_eval_split, list_file_names, list_root, register_benchmark, resolve_targets)
from datasets.export_lists import main as export_main
from datasets.image_lists import DataError
from tests.imagegen import make_image_tree

# The class-level protocols as the project's specification gives them (a copy kept in the repository).
PROTOCOL_JSON = Path(__file__).resolve().parent / "data" / "benchmarks.json"

PACS_DOMAINS = ("art_painting", "cartoon", "photo", "sketch")
PACS_CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")
OFFICEHOME_DOMAINS = ("Art", "Clipart", "Product", "Real_World")


def _domain_class(path: str) -> tuple[str, str]:
    """(domain folder, class folder) of an image path."""
    parts = Path(path).parts
    return parts[-3], parts[-2]


@pytest.fixture(scope="module")
def pacs_root(tmp_path_factory) -> Path:
    """PACS tree with the real folder names, 2 images per (domain, class)."""
    root = tmp_path_factory.mktemp("pacs")
    make_image_tree(root, {f"PACS/kfold/{d}/{c}": 2 for d in PACS_DOMAINS for c in PACS_CLASSES},
                    size=8)
    return root


@pytest.fixture(scope="module")
def officehome_root(tmp_path_factory) -> Path:
    """OfficeHome tree with the real folder names, 1 image per (domain, class)."""
    root = tmp_path_factory.mktemp("officehome")
    classes = BENCHMARKS["OfficeHome_SS_DG"].targets["Art"].class_names
    make_image_tree(root, {f"OfficeHome/{d}/{c}": 1 for d in OFFICEHOME_DOMAINS for c in classes},
                    size=8)
    return root


def _domainnet_tree(root: Path) -> Path:
    """DomainNet real domain, all 50 classes; class i holds (i % 5) + 1 images."""
    names = BENCHMARKS["DomainNet_IN_OUT"].targets["real"].class_names
    make_image_tree(root, {f"DomainNet/real/{c}": (i % 5) + 1 for i, c in enumerate(names)}, size=8)
    return root


# ---------------------------------------------------------------------------------------------
# The protocol table.

def _normalised_json_protocol(entry: dict) -> dict:
    """The JSON entry as {target: (source, target)} with the shared source/target lifted in."""
    if "targets" not in entry:  # DomainNet_IN_OUT: one target, named after its domain
        return {"real": (entry["source"], entry["target"])}
    return {name: (spec.get("source", entry.get("source")), spec["target"])
            for name, spec in entry["targets"].items()}


def test_protocol_table_matches_the_specification():
    spec = json.loads(PROTOCOL_JSON.read_text())
    names = sorted(k for k in spec if not k.startswith("_"))
    assert names == sorted(n for n, b in BENCHMARKS.items() if not b.user_folders and n != "Digits")
    for name in names:
        entry = spec[name]
        bench = BENCHMARKS[name]
        assert bench.root == entry["root"], name
        for protocol in bench.targets.values():
            assert protocol.known_classes == entry["known_classes"], name
            assert {c: i for i, c in enumerate(protocol.class_names)} == entry["labels"], name
        ours = {t: ({d: list(c) for d, c in p.support.items()},
                    {d: list(c) for d, c in p.scored.items()}) for t, p in bench.targets.items()}
        assert ours == _normalised_json_protocol(entry), name


def test_target_names_and_list_names():
    assert benchmark_names() == ["PACS_DG", "PACS_SS_DG", "OfficeHome_DG", "OfficeHome_SS_DG",
                                 "DomainNet_IN_OUT", "Folder", "Digits"]
    assert resolve_targets("PACS_DG", "all") == ["ArtPainting", "Cartoon", "Photo", "Sketch"]
    assert resolve_targets("PACS_SS_DG", "all") == ["ArtPainting", "Cartoon", "Sketch"]
    assert resolve_targets("OfficeHome_DG", "all") == ["Art", "Clipart", "Product", "RealWorld"]
    assert resolve_targets("OfficeHome_SS_DG", "all") == ["Art", "Clipart", "Product"]
    assert resolve_targets("DomainNet_IN_OUT", "all") == ["real"]
    # The targets --export offers: the same list (a user-folder dataset's default stands for any name).
    assert all(dataset_targets(name) == resolve_targets(name, "all") for name in benchmark_names())
    assert list_file_names("PACS_DG", "ArtPainting") == ("no_ArtPainting.txt", "ArtPainting.txt")
    assert list_file_names("OfficeHome_SS_DG", "Clipart") == ("Source.txt", "Clipart.txt")
    assert list_file_names("DomainNet_IN_OUT", "real") == ("in_distribution.txt",
                                                           "out_distribution.txt")
    assert list_root("DomainNet_IN_OUT", "/data") == "/data/DomainNet"
    assert list_root("PACS_DG", "/data") == "/data"


def test_resolve_targets():
    assert resolve_targets("PACS_DG", "all") == ["ArtPainting", "Cartoon", "Photo", "Sketch"]
    assert resolve_targets("OfficeHome_DG", "RealWorld") == ["RealWorld"]
    assert resolve_targets("DomainNet_IN_OUT", None) == ["real"]
    assert resolve_targets("DomainNet_IN_OUT", "all") == ["real"]
    assert resolve_targets("Folder", None) == ["custom"]
    assert resolve_targets("Folder", "all") == ["custom"]
    assert resolve_targets("Folder", "mine") == ["mine"]
    with pytest.raises(DataError, match="choose one of ArtPainting, Cartoon, Photo, Sketch"):
        resolve_targets("PACS_DG", None)
    with pytest.raises(DataError, match="'Photo'.*PACS_SS_DG.*ArtPainting, Cartoon, Sketch"):
        resolve_targets("PACS_SS_DG", "Photo")
    with pytest.raises(DataError, match="'PACS'.*PACS_DG, PACS_SS_DG.*Folder"):
        resolve_targets("PACS", "all")
    with pytest.raises(DataError, match="'Real_World'.*Art, Clipart, Product, RealWorld"):
        list_file_names("OfficeHome_DG", "Real_World")


# ---------------------------------------------------------------------------------------------
# Split derivation from folders.

PACS_DG_SUPPORT = {
    "ArtPainting": {"cartoon": {"dog", "elephant", "guitar"}, "photo": {"dog", "giraffe", "horse"},
                    "sketch": {"elephant", "giraffe", "house"}},
    "Sketch": {"art_painting": {"dog", "giraffe", "horse"},
               "cartoon": {"elephant", "giraffe", "house"},
               "photo": {"dog", "elephant", "guitar"}},
}
PACS_DG_TARGET_DOMAIN = {"ArtPainting": "art_painting", "Cartoon": "cartoon", "Photo": "photo",
                         "Sketch": "sketch"}


@pytest.mark.parametrize("target", ["ArtPainting", "Cartoon", "Photo", "Sketch"])
def test_pacs_dg_split(pacs_root, target):
    split = get_eval_split("PACS_DG", target, str(pacs_root))
    assert (split.dataset, split.target, split.known_classes) == ("PACS_DG", target, 6)
    assert split.class_names == list(PACS_CLASSES)
    # 3 source domains x 3 classes x 2 images; 7 target classes x 2 images.
    assert len(split.support) == 18 and len(split.scored) == 14
    assert split.support == sorted(split.support) and split.scored == sorted(split.scored)
    for path, label in split.support + split.scored:
        assert PACS_CLASSES[label] == _domain_class(path)[1]
        assert Path(path).is_absolute() and Path(path).is_file()
    support_domains = {_domain_class(p)[0] for p, _ in split.support}
    assert support_domains == set(PACS_DOMAINS) - {PACS_DG_TARGET_DOMAIN[target]}
    assert {_domain_class(p)[0] for p, _ in split.scored} == {PACS_DG_TARGET_DOMAIN[target]}
    assert Counter(label for _, label in split.scored) == {i: 2 for i in range(7)}
    assert all(label < 6 for _, label in split.support)
    if target in PACS_DG_SUPPORT:
        found: dict[str, set] = {}
        for path, _ in split.support:
            domain, cls = _domain_class(path)
            found.setdefault(domain, set()).add(cls)
        assert found == PACS_DG_SUPPORT[target]


def test_pacs_dg_label_values(pacs_root):
    split = get_eval_split("PACS_DG", "ArtPainting", str(pacs_root))
    assert split.support[0] == (str(pacs_root / "PACS/kfold/cartoon/dog/img_000.jpg"), 0)
    assert (str(pacs_root / "PACS/kfold/sketch/house/img_001.jpg"), 5) in split.support
    assert split.scored[-1] == (str(pacs_root / "PACS/kfold/art_painting/person/img_001.jpg"), 6)


@pytest.mark.parametrize("target,domain", [("ArtPainting", "art_painting"),
                                           ("Cartoon", "cartoon"), ("Sketch", "sketch")])
def test_pacs_ss_dg_split(pacs_root, target, domain):
    split = get_eval_split("PACS_SS_DG", target, str(pacs_root))
    assert {_domain_class(p) for p, _ in split.support} == {("photo", c) for c in PACS_CLASSES[:6]}
    assert Counter(label for _, label in split.support) == {i: 2 for i in range(6)}
    assert {_domain_class(p)[0] for p, _ in split.scored} == {domain}
    assert Counter(label for _, label in split.scored) == {i: 2 for i in range(7)}


def test_split_is_deterministic(pacs_root):
    first = get_eval_split("PACS_DG", "Photo", str(pacs_root))
    second = get_eval_split("PACS_DG", "Photo", str(pacs_root))
    assert first == second


def test_officehome_dg_realworld(officehome_root):
    split = get_eval_split("OfficeHome_DG", "RealWorld", str(officehome_root))
    assert split.known_classes == 54 and len(split.class_names) == 65
    assert len(split.support) == 78 and len(split.scored) == 27
    assert {_domain_class(p)[0] for p, _ in split.support} == {"Art", "Clipart", "Product"}
    assert {_domain_class(p)[0] for p, _ in split.scored} == {"Real_World"}
    assert (str(officehome_root / "OfficeHome/Art/Notebook/img_000.jpg"), 31) in split.support
    assert (str(officehome_root / "OfficeHome/Product/Candles/img_000.jpg"), 53) in split.support
    assert (str(officehome_root / "OfficeHome/Real_World/Marker/img_000.jpg"), 64) in split.scored
    assert (str(officehome_root / "OfficeHome/Real_World/Drill/img_000.jpg"), 0) in split.scored
    assert sum(label < 54 for _, label in split.scored) == 16
    for path, label in split.support + split.scored:
        assert split.class_names[label] == _domain_class(path)[1]


def test_officehome_ss_dg_clipart(officehome_root):
    split = get_eval_split("OfficeHome_SS_DG", "Clipart", str(officehome_root))
    assert split.known_classes == 25
    assert [label for _, label in split.support] == list(range(25))
    assert {_domain_class(p)[0] for p, _ in split.support} == {"Real_World"}
    assert [label for _, label in split.scored] == list(range(65))  # labels are alphabetical
    assert split.scored[0][0] == str(officehome_root / "OfficeHome/Clipart/Alarm_Clock/img_000.jpg")


def test_domainnet_fallback_split(tmp_path):
    root = _domainnet_tree(tmp_path)
    split = get_eval_split("DomainNet_IN_OUT", None, str(root))
    assert split.target == "real" and split.known_classes == 25
    # n images -> first round(0.7 n) (halves up) to the train side: 1->1, 2->1, 3->2, 4->3, 5->4.
    n_train = {1: 1, 2: 1, 3: 2, 4: 3, 5: 4}
    support_counts = Counter(label for _, label in split.support)
    scored_counts = Counter(label for _, label in split.scored)
    for label in range(50):
        n = (label % 5) + 1
        assert support_counts.get(label, 0) == (n_train[n] if label < 25 else 0), label
        assert scored_counts.get(label, 0) == n - n_train[n], label
    # class 4 ("calendar") has 5 images: img_000..003 support, img_004 scored.
    calendar = root / "DomainNet/real/calendar"
    assert [p for p, l in split.support if l == 4] == [str(calendar / f"img_{i:03d}.jpg")
                                                       for i in range(4)]
    assert [p for p, l in split.scored if l == 4] == [str(calendar / "img_004.jpg")]
    assert split.support == sorted(split.support) and split.scored == sorted(split.scored)


def test_domainnet_official_split_files(tmp_path):
    root = _domainnet_tree(tmp_path)
    names = BENCHMARKS["DomainNet_IN_OUT"].targets["real"].class_names
    train_lines, test_lines = ["real/aircraft_carrier/real_001.jpg 0"], []  # not one of our 50
    for i, cls in enumerate(names):
        images = [f"real/{cls}/img_{k:03d}.jpg {100 + i}" for k in range((i % 5) + 1)]
        train_lines += images[1:] if len(images) > 1 else images
        test_lines += images[:1]
    (root / "DomainNet/real_train.txt").write_text("\n".join(train_lines) + "\n")
    (root / "DomainNet/real_test.txt").write_text("\n".join(test_lines) + "\n")
    split = get_eval_split("DomainNet_IN_OUT", "real", str(root))
    dn = root / "DomainNet"
    expected_support = sorted((str(dn / line.rsplit(" ", 1)[0]), names.index(line.split("/")[1]))
                              for line in train_lines[1:]
                              if names.index(line.split("/")[1]) < 25)
    expected_scored = sorted((str(dn / line.rsplit(" ", 1)[0]), names.index(line.split("/")[1]))
                             for line in test_lines)
    assert split.support == expected_support and split.scored == expected_scored
    assert len(split.scored) == 50 and Counter(l for _, l in split.support)[4] == 4


def test_domainnet_single_split_file_is_an_error(tmp_path):
    root = _domainnet_tree(tmp_path)
    (root / "DomainNet/real_train.txt").write_text("real/circle/img_000.jpg 0\n")
    with pytest.raises(DataError, match=re.escape(str(root / "DomainNet/real_test.txt"))):
        get_eval_split("DomainNet_IN_OUT", "real", str(root))


def test_domainnet_split_file_missing_image(tmp_path):
    root = _domainnet_tree(tmp_path)
    names = BENCHMARKS["DomainNet_IN_OUT"].targets["real"].class_names
    (root / "DomainNet/real_train.txt").write_text(
        "".join(f"real/{c}/img_000.jpg 1\n" for c in names[:24]) + "real/camouflage/gone.jpg 2\n")
    (root / "DomainNet/real_test.txt").write_text(
        "".join(f"real/{c}/img_000.jpg 1\n" for c in names))
    with pytest.raises(DataError, match=re.escape(str(root / "DomainNet/real/camouflage/gone.jpg"))):
        get_eval_split("DomainNet_IN_OUT", "real", str(root))


# ---------------------------------------------------------------------------------------------
# Folder dataset.

def test_folder_dataset_labels(image_tree, tmp_path):
    source = image_tree({"b_cls": 2, "a_cls": 1}, root=tmp_path / "src", size=8)
    target = image_tree({"z_new": 1, "b_cls": 1, "c_new": 2, "a_cls": 1}, root=tmp_path / "tgt",
                        size=8)
    split = get_eval_split("Folder", None, None, source_dir=str(source), target_dir=str(target))
    assert (split.target, split.known_classes) == ("custom", 2)
    assert split.class_names == ["a_cls", "b_cls", "c_new", "z_new"]
    assert [label for _, label in split.support] == [0, 1, 1]
    assert [(_domain_class(p)[1], label) for p, label in split.scored] == [
        ("a_cls", 0), ("b_cls", 1), ("c_new", 2), ("c_new", 2), ("z_new", 3)]
    named = get_eval_split("Folder", "mine", None, source_dir=str(source), target_dir=str(target))
    assert named.target == "mine"


def test_folder_dataset_errors(image_tree, tmp_path):
    source = image_tree({"a": 1}, root=tmp_path / "src", size=8)
    with pytest.raises(DataError, match="needs target_dir"):
        get_eval_split("Folder", None, None, source_dir=str(source))
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "nowhere"))):
        get_eval_split("Folder", None, None, source_dir=str(source),
                       target_dir=str(tmp_path / "nowhere"))
    target = image_tree({"a": 1}, root=tmp_path / "tgt", size=8)
    (target / "b_empty").mkdir()
    with pytest.raises(DataError, match=re.escape(str(target / "b_empty")) + ".*no images"):
        get_eval_split("Folder", None, None, source_dir=str(source), target_dir=str(target))


# ---------------------------------------------------------------------------------------------
# Bad input for the benchmarks.

def test_missing_data_root_names_path_and_layout(tmp_path):
    missing = tmp_path / "no_such_root"
    with pytest.raises(DataError, match=re.escape(f"{missing} does not exist; PACS_DG expects "
                                                  f"{missing}/PACS/kfold/<domain>/<class>/<image>")):
        get_eval_split("PACS_DG", "Photo", str(missing))


def test_missing_benchmark_folder_names_path_and_layout(tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "OfficeHome")) + ".*expects " +
                       re.escape(f"{tmp_path}/OfficeHome/<domain>/<class>/<image>")):
        get_eval_split("OfficeHome_SS_DG", "Art", str(tmp_path))


def test_missing_class_folder_names_it(pacs_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(pacs_root, root)
    shutil.rmtree(root / "PACS/kfold/sketch/house")
    with pytest.raises(DataError, match=re.escape(str(root / "PACS/kfold/sketch/house")) +
                       ".*does not exist"):
        get_eval_split("PACS_DG", "ArtPainting", str(root))


def test_empty_class_folder_names_it(pacs_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(pacs_root, root)
    for image in (root / "PACS/kfold/photo/giraffe").iterdir():
        image.unlink()
    (root / "PACS/kfold/photo/giraffe/readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=re.escape(str(root / "PACS/kfold/photo/giraffe")) +
                       ".*no images"):
        get_eval_split("PACS_SS_DG", "Sketch", str(root))


def test_get_eval_split_rejects_all_and_unknown(pacs_root):
    with pytest.raises(DataError, match="needs one target"):
        get_eval_split("PACS_DG", "all", str(pacs_root))
    with pytest.raises(DataError, match="'Painting'.*ArtPainting, Cartoon, Photo, Sketch"):
        get_eval_split("PACS_DG", "Painting", str(pacs_root))
    with pytest.raises(DataError, match="'Office'.*valid: PACS_DG"):
        get_eval_split("Office", "Art", str(pacs_root))


# ---------------------------------------------------------------------------------------------
# Authors' list files and export_lists.

def test_export_then_read_back_pacs_all_targets(pacs_root, tmp_path):
    out = tmp_path / "lists"
    assert export_main(["--dataset", "PACS_DG", "--target", "all", "--data_root", str(pacs_root),
                        "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "PACS_DG").iterdir()) == sorted(
        [f"{t}.txt" for t in resolve_targets("PACS_DG", "all")] +
        [f"no_{t}.txt" for t in resolve_targets("PACS_DG", "all")])
    first_line = (out / "PACS_DG" / "no_ArtPainting.txt").read_text().splitlines()[0]
    assert first_line == "PACS/kfold/cartoon/dog/img_000.jpg 0"
    for target in resolve_targets("PACS_DG", "all"):
        from_folders = get_eval_split("PACS_DG", target, str(pacs_root))
        from_lists = get_eval_split("PACS_DG", target, str(pacs_root), path_to_txt=str(out))
        assert from_lists == from_folders


def test_export_then_read_back_ss(officehome_root, tmp_path):
    out = tmp_path / "lists"
    export_main(["--dataset", "OfficeHome_SS_DG", "--target", "all", "--data_root",
                 str(officehome_root), "--out", str(out)])
    assert sorted(p.name for p in (out / "OfficeHome_SS_DG").iterdir()) == [
        "Art.txt", "Clipart.txt", "Product.txt", "Source.txt"]
    for target in ("Art", "Product"):
        assert (get_eval_split("OfficeHome_SS_DG", target, str(officehome_root),
                               path_to_txt=str(out))
                == get_eval_split("OfficeHome_SS_DG", target, str(officehome_root)))


def test_export_then_read_back_domainnet(tmp_path):
    root = _domainnet_tree(tmp_path / "data")
    out = tmp_path / "lists"
    export_main(["--dataset", "DomainNet_IN_OUT", "--data_root", str(root), "--out", str(out)])
    lines = (out / "DomainNet_IN_OUT" / "in_distribution.txt").read_text().splitlines()
    assert lines[0].startswith("real/") and all(line.startswith("real/") for line in lines)
    out_lines = (out / "DomainNet_IN_OUT" / "out_distribution.txt").read_text().splitlines()
    assert "real/leg/img_004.jpg 49" in out_lines
    assert (get_eval_split("DomainNet_IN_OUT", "real", str(root), path_to_txt=str(out))
            == get_eval_split("DomainNet_IN_OUT", "real", str(root)))


def test_export_bad_input_writes_nothing(pacs_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(pacs_root, root)
    shutil.rmtree(root / "PACS/kfold/sketch/person")  # only the last target (Sketch) needs it
    out = tmp_path / "lists"
    with pytest.raises(DataError, match=re.escape(str(root / "PACS/kfold/sketch/person"))):
        export_main(["--dataset", "PACS_DG", "--target", "all", "--data_root", str(root),
                     "--out", str(out)])
    assert not out.exists()
    with pytest.raises(DataError, match="'Nope'.*ArtPainting"):
        export_main(["--dataset", "PACS_DG", "--target", "Nope", "--data_root", str(root),
                     "--out", str(out)])
    assert not out.exists()


def _write_lists(folder: Path, support: str, scored: str) -> None:
    """Write PACS_DG ArtPainting list files with the given contents."""
    (folder / "PACS_DG").mkdir(parents=True)
    (folder / "PACS_DG" / "no_ArtPainting.txt").write_text(support)
    (folder / "PACS_DG" / "ArtPainting.txt").write_text(scored)


def test_path_to_txt_reads_authors_lists(pacs_root, tmp_path):
    _write_lists(tmp_path / "l", "PACS/kfold/cartoon/dog/img_001.jpg 0\n",
                 "PACS/kfold/art_painting/person/img_000.jpg 6\n"
                 "PACS/kfold/art_painting/dog/img_000.jpg 0\n")
    split = get_eval_split("PACS_DG", "ArtPainting", str(pacs_root), path_to_txt=str(tmp_path / "l"))
    kfold = pacs_root / "PACS/kfold"
    assert split.support == [(str(kfold / "cartoon/dog/img_001.jpg"), 0)]
    assert split.scored == [(str(kfold / "art_painting/person/img_000.jpg"), 6),
                            (str(kfold / "art_painting/dog/img_000.jpg"), 0)]  # file order kept
    assert split.known_classes == 6 and split.class_names == list(PACS_CLASSES)


def test_path_to_txt_bad_lists(pacs_root, tmp_path):
    good = "PACS/kfold/cartoon/dog/img_001.jpg 0\n"
    _write_lists(tmp_path / "malformed", good, good + "PACS/kfold/cartoon/dog/img_000.jpg x\n")
    with pytest.raises(DataError, match=re.escape(
            str(tmp_path / "malformed/PACS_DG/ArtPainting.txt") + ", line 2")):
        get_eval_split("PACS_DG", "ArtPainting", str(pacs_root),
                       path_to_txt=str(tmp_path / "malformed"))
    _write_lists(tmp_path / "missing", good, "PACS/kfold/photo/dog/img_999.jpg 0\n")
    with pytest.raises(DataError, match=re.escape(str(pacs_root /
                                                      "PACS/kfold/photo/dog/img_999.jpg"))):
        get_eval_split("PACS_DG", "ArtPainting", str(pacs_root),
                       path_to_txt=str(tmp_path / "missing"))
    _write_lists(tmp_path / "label", good, "PACS/kfold/photo/dog/img_000.jpg 7\n")
    with pytest.raises(DataError, match=r"ArtPainting.txt: labels \[7\] are outside 0..6"):
        get_eval_split("PACS_DG", "ArtPainting", str(pacs_root), path_to_txt=str(tmp_path / "label"))
    with pytest.raises(FileNotFoundError, match=re.escape(
            str(tmp_path / "absent/PACS_DG/no_ArtPainting.txt"))):
        get_eval_split("PACS_DG", "ArtPainting", str(pacs_root),
                       path_to_txt=str(tmp_path / "absent"))


# ---------------------------------------------------------------------------------------------
# A new benchmark is one table row.

@pytest.fixture
def toy_benchmark():
    """A throwaway two-domain benchmark registered for one test, removed afterwards."""
    toy = Benchmark(
        name="Toy_DG", root="toy",
        targets={"paint": TargetProtocol(support={"photo": ("cat", "dog")},
                                         scored={"paint": ("cat", "dog", "owl")},
                                         class_names=("cat", "dog", "owl"), known_classes=2)},
        support_list="no_{target}.txt", scored_list="{target}.txt")
    register_benchmark(toy)
    try:
        yield toy
    finally:
        BENCHMARKS.pop("Toy_DG")


def test_a_registered_benchmark_reaches_splits_training_export_and_the_command_line(toy_benchmark, tmp_path):
    import train
    from datasets.train_lists import train_samples, training_set_names, training_uses_target

    root = tmp_path / "data"
    make_image_tree(root, {f"toy/{d}/{c}": 2 for d in ("photo", "paint") for c in ("cat", "dog", "owl")}, size=8)
    split = get_eval_split("Toy_DG", "paint", str(root))
    assert split.known_classes == 2 and split.class_names == ["cat", "dog", "owl"]
    assert [(_domain_class(p), label) for p, label in split.support] == [
        (("photo", "cat"), 0), (("photo", "cat"), 0), (("photo", "dog"), 1), (("photo", "dog"), 1)]
    assert sorted({label for _, label in split.scored}) == [0, 1, 2] and len(split.scored) == 6
    assert resolve_targets("Toy_DG", None) == ["paint"]
    # Training on it uses the named target's support set; the command line offers it.
    assert "Toy_DG" in training_set_names() and training_uses_target("Toy_DG")
    assert train_samples("Toy_DG", str(root), target="paint") == split.support
    assert train.get_args_parser().parse_args(["--dataset", "Toy_DG"]).dataset == "Toy_DG"
    # The export writes the authors' list format, which reads back as the same split.
    out = tmp_path / "lists"
    assert export_main(["--dataset", "Toy_DG", "--data_root", str(root), "--out", str(out)]) == 0
    assert get_eval_split("Toy_DG", "paint", str(root), path_to_txt=str(out)) == split
    with pytest.raises(ValueError, match="'Toy_DG' is already registered"):
        register_benchmark(toy_benchmark)


def test_protocols_refuse_unlabelled_or_unknown_support_classes():
    with pytest.raises(ValueError, match=r"classes \['owl'\] have no label"):
        TargetProtocol(support={"a": ("cat",)}, scored={"b": ("owl",)}, class_names=("cat",), known_classes=1)
    with pytest.raises(ValueError, match=r"support classes \['dog'\] are not among the known classes"):
        TargetProtocol(support={"a": ("dog",)}, scored={"b": ("cat",)}, class_names=("cat", "dog"), known_classes=1)
