"""Result groups (evaluation/groups.py) and the run folder's settings (evaluation/run_settings.py), without models."""
import json
import os
import socket
import subprocess
import sys
import threading

import pytest

from evaluation.groups import (GroupError, group_name, latest_group, list_groups, settings_hash,
                               validate_tag, write_group)
from evaluation.run_settings import RunSettingsError, resolve_run_settings
from utils.run_args import RunArgsError, read_run_args

RECORD = {"checkpoint": "/runs/a", "iteration": 300, "network": "resnet18", "objective": "L2", "depth": 4,
          "embed_dim": 768, "n_heads": 12, "scorers": ["resend"], "image_size": 32, "amp": "none",
          "few_shot": None, "seed": 0, "NNK": 1, "data_root": "/data", "path_to_txt": None,
          "source_dir": None, "target_dir": None, "overrides": {}, "run_args": "/runs/a/args.json"}


def digest(**changes):
    return settings_hash("only_eval", "Digits", ["seen", "novel"], {**RECORD, **changes})


def test_hash_covers_every_number_changing_setting_and_not_locations():
    base = digest()
    assert len(base) == 8 and int(base, 16) >= 0
    assert digest() == base
    changed = [digest(**{key: value}) for key, value in
               [("image_size", 224), ("n_heads", 6), ("depth", 2), ("embed_dim", 384), ("network", "resnet50"),
                ("objective", "CE"), ("iteration", 200), ("few_shot", 5), ("seed", 1), ("NNK", 3),
                ("amp", "bf16"), ("scorers", ["resend", "knn"]), ("data_root", "/other"),
                ("path_to_txt", "/lists"), ("source_dir", "/s"), ("target_dir", "/t")]]
    assert base not in changed and len(set(changed)) == len(changed)
    assert settings_hash("only_eval", "Digits", ["seen"], RECORD) != base
    assert settings_hash("periodic", "Digits", ["seen", "novel"], RECORD) != base
    assert settings_hash("only_eval", "PACS_DG", ["seen", "novel"], RECORD) != base
    # Where things are does not change the numbers: a moved folder re-run is the same evaluation.
    assert digest(checkpoint="/moved/a", run_args=None, overrides={"image_size": {"run": 32, "given": 64}}) == base
    with pytest.raises(ValueError, match="unknown evaluation kind 'train'"):
        settings_hash("train", "Digits", ["seen"], RECORD)


def test_group_names_and_tags():
    assert group_name("Digits", 300, "0123abcd") == "Digits_it300_0123abcd"
    assert group_name("PACS_DG", None, "0123abcd") == "PACS_DG_itna_0123abcd"
    assert group_name("Digits", 300, "0123abcd", tag="paper-table.v2") == "paper-table.v2"
    for bad in ("a/b", ".hidden", "", "x y", "../up", "a" * 101):
        with pytest.raises(ValueError, match="--tag .* must be 1-100 letters, digits"):
            validate_tag(bad)


def write(eval_root, name, hash_, content, kind="only_eval", iteration=300):
    """A group with one file, `result.json`, holding `content`."""
    def files(folder):
        with open(os.path.join(folder, "result.json"), "w", encoding="utf-8") as out:
            out.write(content)
        return ["result.json"]
    return write_group(str(eval_root), name, {"hash": hash_, "kind": kind, "dataset": "Digits",
                                              "iteration": iteration}, files)


def test_write_group_is_whole_and_listed(tmp_path):
    eval_root = tmp_path / "run" / "eval"
    path = write(eval_root, "Digits_it300_aaaaaaaa", "aaaaaaaa", "first")
    assert path == str(eval_root / "Digits_it300_aaaaaaaa")
    assert sorted(os.listdir(path)) == ["manifest.json", "result.json"]
    manifest = json.loads((eval_root / "Digits_it300_aaaaaaaa" / "manifest.json").read_text())
    assert manifest["files"] == ["result.json"] and manifest["hash"] == "aaaaaaaa"
    assert manifest["name"] == "Digits_it300_aaaaaaaa" and manifest["format"] == 1
    assert os.listdir(eval_root) == ["Digits_it300_aaaaaaaa"]  # no temporary folder left
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o755)
    assert [g.path for g in list_groups(str(tmp_path / "run"))] == [path]


def test_identical_rerun_replaces_only_its_own_group(tmp_path):
    eval_root = tmp_path / "eval"
    write(eval_root, "Digits_it300_aaaaaaaa", "aaaaaaaa", "first")
    other = write(eval_root, "Digits_it300_bbbbbbbb", "bbbbbbbb", "other settings")
    other_bytes = {name: open(os.path.join(other, name), "rb").read() for name in os.listdir(other)}
    write(eval_root, "Digits_it300_aaaaaaaa", "aaaaaaaa", "second")
    assert (eval_root / "Digits_it300_aaaaaaaa" / "result.json").read_text() == "second"
    assert {name: open(os.path.join(other, name), "rb").read() for name in os.listdir(other)} == other_bytes
    assert sorted(os.listdir(eval_root)) == ["Digits_it300_aaaaaaaa", "Digits_it300_bbbbbbbb"]


def test_a_name_holding_other_results_is_never_replaced(tmp_path):
    eval_root = tmp_path / "eval"
    write(eval_root, "mytag", "aaaaaaaa", "first")
    before = (eval_root / "mytag" / "manifest.json").read_bytes()
    with pytest.raises(GroupError, match=r"eval/mytag holds an evaluation with other settings \(hash aaaaaaaa, "
                                         r"this one bbbbbbbb\)"):
        write(eval_root, "mytag", "bbbbbbbb", "second")
    assert (eval_root / "mytag" / "result.json").read_text() == "first"
    assert (eval_root / "mytag" / "manifest.json").read_bytes() == before
    foreign = eval_root / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("the user's")
    with pytest.raises(GroupError, match="eval/notes exists and is not an evaluation group"):
        write(eval_root, "notes", "aaaaaaaa", "x")
    assert os.listdir(foreign) == ["mine.txt"]
    assert sorted(os.listdir(eval_root)) == ["mytag", "notes"]


def test_failures_leave_no_partial_group(tmp_path):
    eval_root = tmp_path / "eval"
    write(eval_root, "g", "aaaaaaaa", "kept")

    def failing(folder):
        with open(os.path.join(folder, "half.json"), "w") as out:
            out.write("{")
        raise ValueError("scorer blew up")
    with pytest.raises(ValueError, match="scorer blew up"):
        write_group(str(eval_root), "g", {"hash": "aaaaaaaa"}, failing)
    assert os.listdir(eval_root) == ["g"] and (eval_root / "g" / "result.json").read_text() == "kept"

    def disk_full(folder):
        raise OSError(28, "No space left on device", os.path.join(folder, "x.csv"))
    with pytest.raises(GroupError, match=r"cannot write the evaluation group .*eval/h: No space left on device"):
        write_group(str(eval_root), "h", {"hash": "cccccccc"}, disk_full)
    assert os.listdir(eval_root) == ["g"]


def test_unwritable_eval_folder_names_the_group(tmp_path):
    (tmp_path / "eval").write_text("a file where the eval folder should be")
    with pytest.raises(GroupError, match=r"cannot write the evaluation group .*/eval/g: File exists"):
        write(tmp_path / "eval", "g", "aaaaaaaa", "x")
    if os.geteuid() != 0:  # root ignores permissions
        read_only = tmp_path / "ro" / "eval"
        read_only.mkdir(parents=True)
        read_only.chmod(0o555)
        try:
            with pytest.raises(GroupError, match=r"cannot write the evaluation group .*ro/eval/g: Permission denied"):
                write(read_only, "g", "aaaaaaaa", "x")
        finally:
            read_only.chmod(0o755)


def test_stale_temp_folders_of_dead_writers_are_removed(tmp_path):
    eval_root = tmp_path / "eval"
    eval_root.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    host = socket.gethostname().replace("_", "-")
    stale = eval_root / f".partial_{host}_{dead_pid}_x1"
    stale_aside = eval_root / f".replaced_{host}_{dead_pid}_x2"
    alive = eval_root / f".partial_{host}_{os.getpid()}_x3"  # a concurrent writer's: kept
    for folder in (stale, stale_aside, alive):
        folder.mkdir()
        (folder / "a.csv").write_text("1")
    write(eval_root, "g", "aaaaaaaa", "x")
    assert sorted(os.listdir(eval_root)) == sorted(["g", alive.name])


def test_concurrent_writers(tmp_path):
    """Identical runs racing for one name end with one complete group; different runs keep theirs."""
    eval_root = tmp_path / "eval"
    errors = []

    def worker(name, hash_, content):
        try:
            write(eval_root, name, hash_, content)
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)
    threads = [threading.Thread(target=worker, args=("same", "aaaaaaaa", f"run {i}")) for i in range(4)]
    threads += [threading.Thread(target=worker, args=(f"other{i}", f"{i:08d}", f"other {i}")) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(os.listdir(eval_root)) == ["other0", "other1", "other2", "same"]
    assert (eval_root / "same" / "result.json").read_text().startswith("run ")
    assert all((eval_root / f"other{i}" / "result.json").read_text() == f"other {i}" for i in range(3))


def test_latest_group_filters_by_manifest(tmp_path):
    eval_root = tmp_path / "eval"
    write(eval_root, "Digits_it100_aaaaaaaa", "aaaaaaaa", "1", kind="periodic", iteration=100)
    write(eval_root, "Digits_it300_bbbbbbbb", "bbbbbbbb", "2", kind="periodic", iteration=300)
    write(eval_root, "Digits_it300_cccccccc", "cccccccc", "3", kind="only_eval", iteration=300)
    assert latest_group(str(tmp_path)).path.endswith("Digits_it300_cccccccc")
    assert latest_group(str(tmp_path), kind="periodic").path.endswith("Digits_it300_bbbbbbbb")
    assert latest_group(str(tmp_path), kind="periodic", iteration=100).path.endswith("Digits_it100_aaaaaaaa")
    with pytest.raises(FileNotFoundError, match="no evaluation group with kind 'periodic', iteration 7 in .*eval"):
        latest_group(str(tmp_path), kind="periodic", iteration=7)
    with pytest.raises(FileNotFoundError, match="no evaluation group in"):
        latest_group(str(tmp_path / "elsewhere"))


# ---------------------------------------------------------------- run_settings

DEFAULTS = {"image_size": 224, "transf_n_heads": 12}


def test_run_settings_come_from_args_json(tmp_path):
    (tmp_path / "args.json").write_text(json.dumps({"image_size": 32, "transf_n_heads": 6, "seed": 3}))
    run = resolve_run_settings(str(tmp_path), DEFAULTS, explicit=set())
    assert (run.image_size, run.n_heads, run.overrides) == (32, 6, {})
    assert run.run_args == str(tmp_path / "args.json")
    assert run.messages == [f"settings of the run from {tmp_path}/args.json: image_size 32, transf_n_heads 6"]
    explicit = resolve_run_settings(str(tmp_path), {"image_size": 64, "transf_n_heads": 6}, {"image_size",
                                                                                          "transf_n_heads"})
    assert (explicit.image_size, explicit.n_heads) == (64, 6)
    assert explicit.overrides == {"image_size": {"run": 32, "given": 64}}
    assert explicit.messages == [f"--image_size 64 overrides the run's 32 ({tmp_path}/args.json)"]
    api = resolve_run_settings(str(tmp_path), {"image_size": 64, "transf_n_heads": 12}, {"image_size"},
                               keywords=True)
    assert api.messages[-1] == f"image_size=64 overrides the run's 32 ({tmp_path}/args.json)"


def test_folders_without_args_json_keep_the_defaults(tmp_path):
    run = resolve_run_settings(str(tmp_path), DEFAULTS, explicit=set())
    assert (run.image_size, run.n_heads, run.run_args) == (224, 12, None)
    assert run.messages == [f"no args.json in {tmp_path}: using --image_size 224, --transf_n_heads 12"]
    run = resolve_run_settings(str(tmp_path), {"image_size": 64, "transf_n_heads": 12}, {"image_size"})
    assert run.image_size == 64 and run.messages == [f"no args.json in {tmp_path}: using --transf_n_heads 12"]
    (tmp_path / "args.json").write_text(json.dumps({"seed": 1}))
    run = resolve_run_settings(str(tmp_path), DEFAULTS, explicit=set())
    assert (run.image_size, run.n_heads) == (224, 12)
    assert run.messages == [f"{tmp_path}/args.json does not record image_size; using --image_size 224",
                            f"{tmp_path}/args.json does not record transf_n_heads; using --transf_n_heads 12"]


@pytest.mark.parametrize("content, error, message", [
    ("{not json", RunArgsError, "cannot read the run's settings .*args.json: Expecting property name"),
    ("[1, 2]", RunArgsError, "args.json should hold a JSON object of flags, got a list"),
    ('{"image_size": "32"}', RunSettingsError, r"args.json: image_size is '32', expected an integer >= 32"),
    ('{"transf_n_heads": 0}', RunSettingsError, r"args.json: transf_n_heads is 0, expected an integer >= 1"),
    ('{"image_size": true}', RunSettingsError, r"args.json: image_size is True, expected an integer >= 32"),
])
def test_bad_args_json_is_an_error_naming_it(tmp_path, content, error, message):
    (tmp_path / "args.json").write_text(content)
    with pytest.raises(error, match=message):
        resolve_run_settings(str(tmp_path), DEFAULTS, explicit=set())


def test_unreadable_args_json_names_the_path(tmp_path):
    (tmp_path / "args.json").mkdir()  # unreadable for root too
    with pytest.raises(RunArgsError, match=f"cannot read the run's settings {tmp_path}/args.json: Is a directory"):
        read_run_args(str(tmp_path))
    (tmp_path / "args.json").rmdir()
    (tmp_path / "args.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(RunArgsError, match="cannot read the run's settings .*args.json"):
        read_run_args(str(tmp_path))


def test_a_group_swapped_between_two_looks_is_not_mistaken_for_a_foreign_folder(tmp_path, monkeypatch):
    """The race of concurrent identical runs: the name's manifest is unreadable for one look (its group
    is being moved aside and another put in place), then readable again."""
    import evaluation.groups as groups

    eval_root = tmp_path / "eval"
    write(eval_root, "same", "aaaaaaaa", "run 1")
    real_read, looks = groups.read_manifest, []

    def read_during_a_swap(path):
        looks.append(path)
        return None if len(looks) == 1 else real_read(path)

    monkeypatch.setattr(groups, "read_manifest", read_during_a_swap)
    groups.check_slot(str(eval_root), "same", "aaaaaaaa")  # no GroupError
    assert len(looks) == 2
    # A folder that stays without a manifest is still refused, after a few looks.
    (eval_root / "notes").mkdir()
    looks.clear()
    with pytest.raises(GroupError, match="eval/notes exists and is not an evaluation group"):
        groups.check_slot(str(eval_root), "notes", "aaaaaaaa")
    assert len(looks) == groups.SLOT_LOOKS
