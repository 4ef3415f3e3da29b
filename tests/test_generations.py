"""Checkpoint generations: one complete generation per save, atomic switch of `last`, pruning, write errors."""
import errno
import os
import re

import pytest
import torch

import train
from models.backbone import ResNetBackbone
from models.checkpoint import CheckpointError, load_model_folder, read_state_file, save_model_folder
from models.relational import RelationalTransformer
from models.resend import ReSeND
from training.state import (
    CheckpointWriteError, load_training_state, mark_best, read_best_score, write_generation,
)
from utils.precision import grad_scaler

GENERATION_FILES = ("feature_extractor.pkl", "cls_rel.pkl", "last_checkpoint.txt", "checkpoint.pth")


@pytest.fixture(scope="module")
def parts():
    """A small model (resnet18, one narrow relational block), its optimiser and scaler, and train.py args."""
    torch.manual_seed(0)
    model = ReSeND(ResNetBackbone("resnet18"),
                   RelationalTransformer(feat_dim=512, n_outputs=1, depth=1, embed_dim=32, n_heads=4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    args = train.get_args_parser().parse_args(["--device", "cpu", "--transf_depth", "1"])
    return model, optimizer, grad_scaler(torch.device("cpu"), "none"), args


def save(folder, parts, iteration):
    """A generation whose weights say which iteration they belong to (head bias and bn1 bias = iteration)."""
    model, optimizer, scaler, args = parts
    with torch.no_grad():
        model.relational.head.bias.fill_(iteration)
        model.backbone.bn1.bias.fill_(iteration)
    return write_generation(str(folder), model, optimizer, scaler, iteration, pairs_seen=8 * iteration,
                            flags=vars(args))


def assert_one_generation(folder, iteration):
    """The folder loads as exactly `iteration`: model files and training state from the same generation."""
    loaded = load_model_folder(str(folder), n_heads=4)
    assert loaded.iteration == iteration
    assert loaded.source == str(folder / "checkpoints" / f"it{iteration:06d}")
    assert torch.all(loaded.relational.head.bias == iteration)
    assert torch.all(loaded.backbone.bn1.bias == iteration)
    state = load_training_state(str(folder / "checkpoint.pth"), torch.device("cpu"))
    assert state["iteration"] == iteration and torch.all(state["relational"]["head.bias"] == iteration)
    # The authors' tools read the run folder's own names, links into the same generation.
    assert torch.all(read_state_file(str(folder / "cls_rel.pkl"))["head.bias"] == iteration)
    assert torch.all(read_state_file(str(folder / "feature_extractor.pkl"))["model_resnet.bn1.bias"] == iteration)
    assert (folder / "last_checkpoint.txt").read_text().strip() == str(iteration)


def temp_entries(folder):
    """Every temp file, folder or link left under `folder`."""
    return [str(p) for p in folder.rglob(".tmp*")]


def test_layout_and_links(tmp_path, parts):
    folder = tmp_path / "run"
    folder.mkdir()
    path = save(folder, parts, 3)
    assert path == str(folder / "checkpoints" / "it000003")
    assert sorted(os.listdir(path)) == sorted(GENERATION_FILES)
    assert os.readlink(folder / "checkpoints" / "last") == "it000003"
    for name in GENERATION_FILES:
        assert os.readlink(folder / name) == os.path.join("checkpoints", "last", name)
    assert_one_generation(folder, 3)
    save(folder, parts, 6)
    assert sorted(os.listdir(folder / "checkpoints")) == ["it000006", "last"]  # it000003 pruned
    assert_one_generation(folder, 6)
    assert temp_entries(folder) == []
    assert load_model_folder(str(folder), n_heads=4).describe() == \
        f"loaded iteration 6 from {folder}/checkpoints/it000006"


def test_a_kill_at_any_rename_leaves_one_whole_generation(tmp_path, parts, monkeypatch):
    folder = tmp_path / "run"
    folder.mkdir()
    save(folder, parts, 3)
    real_replace, real_rename = os.replace, os.rename
    calls = []

    def counting(real, fail_at):
        def rename(src, dst, *args, **kwargs):
            calls.append(os.path.basename(dst))
            if len(calls) == fail_at:
                raise KeyboardInterrupt(f"killed at rename {fail_at} ({dst})")
            return real(src, dst, *args, **kwargs)
        return rename

    def patch(fail_at):
        calls.clear()
        monkeypatch.setattr(os, "replace", counting(real_replace, fail_at))
        monkeypatch.setattr(os, "rename", counting(real_rename, fail_at))

    # A save renames the 4 staged files inside the staging folder, the folder, then the `last` link.
    probe = tmp_path / "probe"
    probe.mkdir()
    save(probe, parts, 1)
    patch(fail_at=0)  # counts only
    save(probe, parts, 2)
    monkeypatch.undo()
    assert len(calls) == 6 and calls[-2:] == ["it000002", "last"], calls
    for fail_at in range(1, 7):
        patch(fail_at)
        with pytest.raises(KeyboardInterrupt, match=f"killed at rename {fail_at}"):
            save(folder, parts, 6)
        monkeypatch.undo()
        assert_one_generation(folder, 3)
        assert temp_entries(folder) == [], fail_at
    # The generation renamed into place just before the killed link switch is an orphan: a later
    # save of that iteration takes another name, and the orphan is pruned.
    assert sorted(os.listdir(folder / "checkpoints")) == ["it000003", "it000006", "last"]
    path = save(folder, parts, 6)
    assert path == str(folder / "checkpoints" / "it000006.1")
    assert sorted(os.listdir(folder / "checkpoints")) == ["it000006.1", "last"]
    loaded = load_model_folder(str(folder), n_heads=4)
    assert loaded.iteration == 6 and torch.all(loaded.relational.head.bias == 6)


@pytest.mark.parametrize("failure, reason", [
    (OSError(errno.ENOSPC, "No space left on device"), r"\[Errno 28\] No space left on device"),
    (RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                  "data/0: file write failed"), r"RuntimeError: \[enforce fail .*file write failed"),
])
def test_a_full_disk_names_the_path_and_free_space_and_keeps_the_last_generation(tmp_path, parts, monkeypatch,
                                                                                 failure, reason):
    folder = tmp_path / "run"
    folder.mkdir()
    save(folder, parts, 3)
    real_save = torch.save
    calls = []

    def failing_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # checkpoint.pth, after both model files
            f.write(b"partial")
            raise failure
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    checkpoints = folder / "checkpoints"
    with pytest.raises(CheckpointWriteError) as caught:
        save(folder, parts, 6)
    monkeypatch.undo()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"cannot write checkpoint {checkpoints / 'it000006'}: ")
    assert re.search(reason, message), message
    assert message.endswith(f" free on the filesystem of {checkpoints}; "
                            f"last checkpoint: iteration 3 ({checkpoints / 'it000003'}), unchanged"), message
    assert isinstance(caught.value, OSError)
    assert_one_generation(folder, 3)
    assert temp_entries(folder) == []


def test_other_errors_are_not_reported_as_write_errors(tmp_path, parts, monkeypatch):
    folder = tmp_path / "run"
    folder.mkdir()
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("CUDA error: boom")))
    with pytest.raises(RuntimeError, match="^CUDA error: boom$") as caught:
        save(folder, parts, 1)
    assert not isinstance(caught.value, CheckpointWriteError)
    assert temp_entries(folder) == [] and not os.path.lexists(folder / "checkpoints" / "last")


def test_pruning_keeps_only_last_and_best(tmp_path, parts):
    folder = tmp_path / "run"
    folder.mkdir()
    save(folder, parts, 1)
    second = save(folder, parts, 2)
    mark_best(str(folder), second, {"iteration": 2, "score": 0.7})
    save(folder, parts, 3)
    save(folder, parts, 4)
    assert sorted(os.listdir(folder / "checkpoints")) == ["best", "it000002", "it000004", "last"]
    assert read_best_score(str(folder)) == ({"iteration": 2, "score": 0.7}, None)
    best = load_model_folder(str(folder / "checkpoints" / "best"), n_heads=4)
    assert best.iteration == 2 and torch.all(best.relational.head.bias == 2)
    assert load_model_folder(str(folder), n_heads=4).iteration == 4
    mark_best(str(folder), str(folder / "checkpoints" / "it000004"), {"iteration": 4, "score": 0.8})
    assert sorted(os.listdir(folder / "checkpoints")) == ["best", "it000004", "last"]


def test_a_dangling_last_link_is_an_error_naming_it(tmp_path, parts):
    folder = tmp_path / "run"
    folder.mkdir()
    save(folder, parts, 1)
    os.replace(folder / "checkpoints" / "it000001", folder / "checkpoints" / "moved")
    with pytest.raises(CheckpointError, match=f"{folder}/checkpoints/last points to .*it000001, which is not a folder"):
        load_model_folder(str(folder), n_heads=4)


def test_save_model_folder_refuses_a_run_folder(tmp_path, parts):
    folder = tmp_path / "run"
    folder.mkdir()
    save(folder, parts, 1)
    model = parts[0]
    with pytest.raises(CheckpointError, match=f"{folder} is a training run folder"):
        save_model_folder(str(folder), model.backbone, model.relational, iteration=2)
    assert_one_generation(folder, 1)


def test_best_is_the_highest_mean_auroc_of_the_periodic_evaluations_across_resumes(image_tree, tmp_path,
                                                                                  monkeypatch):
    import training.main
    from tests.test_training import run, train_argv
    root = image_tree({"train/a": 4, "train/b": 4, "train/c": 4, "target/a": 3, "target/b": 3, "target/d": 3},
                      root=tmp_path / "data", size=20)
    out = tmp_path / "out"
    scores = {}
    real_candidate = training.main.best_candidate

    def recording_candidate(results, iteration):
        candidate = real_candidate(results, iteration)
        scores[iteration] = candidate["score"]
        return candidate

    monkeypatch.setattr(training.main, "best_candidate", recording_candidate)
    evaluation = ["--eval_dataset", "Folder", "--source_dir", str(root / "train"), "--target_dir", str(root / "target"),
                  "--eval_period", "2", "--eval_batch_size", "9"]
    # Evaluations at 2, 4, 6; saves at 3 and 6: a best evaluation at 2 or 4 needs a generation of its own.
    run(train_argv(root / "train", out, "--iterations", "6", *evaluation))
    folder = out / "Folder_resnet18_rel_transformer"

    def check(evaluated):
        assert sorted(scores) == evaluated
        best = max(scores, key=lambda it: (scores[it], -it))  # the first of equal scores stays the best
        assert os.readlink(folder / "checkpoints" / "best") == f"it{best:06d}"
        record, warning = read_best_score(str(folder))
        assert warning is None and record["iteration"] == best and record["score"] == scores[best]
        assert record["metric"] == "mean auroc" and record["targets"] == ["Folder/custom"]
        assert load_model_folder(str(folder / "checkpoints" / "best")).iteration == best
        last = load_model_folder(str(folder)).iteration
        kept = {f"it{best:06d}", f"it{last:06d}"}
        assert sorted(os.listdir(folder / "checkpoints")) == sorted(kept | {"best", "last"})

    check([2, 4, 6])
    run(train_argv(root / "train", out, "--iterations", "10", *evaluation, "--resume", "--resume_override"))
    check([2, 4, 6, 8, 10])
