"""--resume / --auto_resume continue only what matches the checkpoint, unless --resume_override (recorded);
older flat run folders still load and resume."""
import json
import os
import re
import shutil
from dataclasses import dataclass

import pytest
import torch

import train
from models.checkpoint import load_model_folder
from tests.test_run_folder import RUN, snapshot
from tests.test_training import final_state, interrupt_at, run, train_argv
from evaluation.scorers import SCORERS, Scorer, hyperparameter, register_scorer
from training.state import (RESUME_MAY_CHANGE, RESUME_MUST_MATCH, ResumeMismatchError, resume_differences,
                            resume_free)
from training.stopping import TrainingInterrupted

GENERATION_FILES = ("feature_extractor.pkl", "cls_rel.pkl", "last_checkpoint.txt", "checkpoint.pth")
# Set on args by init_distributed_mode and train.parse_command_line, not by the parser; recorded all the same.
RUNTIME_ARGS = {"world_size", "distributed", "explicit_flags"}


@pytest.fixture
def train_root(image_tree, tmp_path):
    """Three colour-coded classes of four 20-px images."""
    return image_tree({"train/a": 4, "train/b": 4, "train/c": 4}, root=tmp_path / "data", size=20) / "train"


@pytest.fixture
def trained(train_root, tmp_path):
    """A run folder holding the checkpoint of iteration 3 of a 3-iteration run."""
    out = tmp_path / "out"
    run(train_argv(train_root, out, "--iterations", "3"))
    return out / RUN


def test_every_flag_is_classified_for_resume():
    dests = {action.dest for action in train.get_args_parser()._actions if action.dest != "help"}
    lists = {"RESUME_MUST_MATCH": set(RESUME_MUST_MATCH), "RESUME_MAY_CHANGE": set(RESUME_MAY_CHANGE),
             "resume_free()": set(resume_free())}
    classified = [name for names in lists.values() for name in names]
    assert len(classified) == len(set(classified)), "a setting is in two lists"
    assert sorted(dests - set(classified)) == [], "classify these flags in training/state.py"
    assert sorted(set(classified) - dests - RUNTIME_ARGS) == [], "no such flag"


def test_the_flag_of_a_scorer_registered_after_import_is_free_on_resume():
    assert "test_late_margin" not in resume_free()
    try:
        @register_scorer("test_late_scorer", "registered after training.state was imported")
        @dataclass
        class LateScorer(Scorer):
            margin: float = hyperparameter(0.5, "a margin", flag="test_late_margin")

        assert "test_late_margin" in resume_free()
        refused, changed = resume_differences({"test_late_margin": 0.5, "seed": 0},
                                              {"test_late_margin": 0.9, "seed": 0})
        assert (refused, changed) == ({}, {})
    finally:
        SCORERS.pop("test_late_scorer", None)
    assert "test_late_margin" not in resume_free()
    refused, _ = resume_differences({"test_late_margin": 0.5}, {"test_late_margin": 0.9})
    assert refused == {"test_late_margin": (0.5, 0.9)}


def test_a_changed_learning_rate_is_refused_naming_the_flag_and_both_values(train_root, tmp_path, trained):
    before = snapshot(trained)
    with pytest.raises(ResumeMismatchError) as caught:
        run(train_argv(train_root, tmp_path / "out", "--iterations", "3", "--learning_rate", "0.01", "--resume"))
    assert str(caught.value) == (
        f"--resume: {trained}/checkpoints/it000003/checkpoint.pth was trained with other settings: "
        "--learning_rate 0.008 -> 0.01; resume with the same flags, or add --resume_override to continue with "
        "the new ones (recorded in args.json)")
    assert snapshot(trained) == before


def test_every_difference_is_listed_on_one_line(train_root, tmp_path, trained):
    with pytest.raises(ResumeMismatchError) as caught:
        run(train_argv(train_root, tmp_path / "out", "--iterations", "6", "--seed", "1", "--image_size", "64",
                       "--lr_schedule", "cosine", "--auto_resume"))
    message = str(caught.value)
    assert "\n" not in message and message.startswith("--auto_resume: ")
    assert ("other settings: --image_size 32 -> 64, --iterations 3 -> 6, --lr_schedule step -> cosine, "
            "--seed 0 -> 1; ") in message


def test_an_overridden_resume_is_logged_and_recorded(train_root, tmp_path, trained):
    old_args = json.loads((trained / "args.json").read_text())
    run(train_argv(train_root, tmp_path / "out", "--iterations", "6", "--learning_rate", "0.01", "--batch_size", "4",
                   "--resume", "--resume_override"))
    args = json.loads((trained / "args.json").read_text())
    assert args["learning_rate"] == 0.01 and args["iterations"] == 6 and args["batch_size"] == 4
    state = f"{trained}/checkpoints/it000003/checkpoint.pth"
    assert args["resume_overrides"] == [{"iteration": 3, "checkpoint": state, "settings": {
        "iterations": {"checkpoint": 3, "now": 6}, "learning_rate": {"checkpoint": 0.008, "now": 0.01}}}]
    assert args["resume_changes"] == [{"iteration": 3, "checkpoint": state,
                                       "settings": {"batch_size": {"checkpoint": 8, "now": 4}}}]
    assert old_args["learning_rate"] == 0.008
    log = (trained / "out.txt").read_text()
    assert (f"resumed from {trained} at iteration 3 ({trained}/checkpoints/it000003); --resume_override: "
            "--iterations 3 -> 6, --learning_rate 0.008 -> 0.01; changed: --batch_size 8 -> 4") in log
    assert load_model_folder(str(trained)).iteration == 6
    # A later resume keeps the earlier records and compares with the new checkpoint's settings.
    run(train_argv(train_root, tmp_path / "out", "--iterations", "9", "--learning_rate", "0.01", "--batch_size", "4",
                   "--resume", "--resume_override"))
    args = json.loads((trained / "args.json").read_text())
    assert [entry["iteration"] for entry in args["resume_overrides"]] == [3, 6]
    assert args["resume_overrides"][1]["settings"] == {"iterations": {"checkpoint": 6, "now": 9}}
    assert len(args["resume_changes"]) == 1


def flatten(folder):
    """Turn a run folder into what this project's older versions wrote: regular files, no checkpoints/, and a
    checkpoint.pth whose flags include `rank` and `gpu` and which holds a copy of the schedule."""
    for name in GENERATION_FILES:
        target = os.path.realpath(folder / name)
        os.remove(folder / name)
        shutil.copyfile(target, folder / name)
    shutil.rmtree(folder / "checkpoints")
    state = torch.load(folder / "checkpoint.pth", weights_only=False)
    assert "schedule" not in state and not {"rank", "gpu"} & set(state["args"])
    state["args"].update(rank=0, gpu=None)
    state["schedule"] = {key: state["args"][key] for key in ("learning_rate", "warmup", "step_after", "lr_schedule",
                                                             "iterations")}
    torch.save(state, folder / "checkpoint.pth")


def test_an_older_flat_run_folder_loads_and_resumes_to_the_uninterrupted_weights(train_root, tmp_path):
    straight = tmp_path / "straight"
    run(train_argv(train_root, straight, "--iterations", "6"))
    out = tmp_path / "out"
    with interrupt_at(5), pytest.raises(TrainingInterrupted):
        run(train_argv(train_root, out, "--iterations", "6"))
    folder = out / RUN
    flatten(folder)
    (folder / ".tmp_k3j4h5g6.pth").write_bytes(b"an older version's leftover")
    loaded = load_model_folder(str(folder))
    assert loaded.iteration == 3 and loaded.source == str(folder)

    run(train_argv(train_root, out, "--iterations", "6", "--resume"))

    log = (folder / "out.txt").read_text()
    assert f"resumed from {folder} at iteration 3 ({folder})" in log
    assert re.search(r"left 1 temp file\(s\) of an older version whose writer is unknown .*\.tmp_k3j4h5g6\.pth", log)
    # The flat files were superseded by the first generation and are now links into it.
    assert sorted(os.listdir(folder / "checkpoints")) == ["it000006", "last"]
    for name in GENERATION_FILES:
        assert os.readlink(folder / name) == os.path.join("checkpoints", "last", name)
    expected, resumed = final_state(straight / RUN), final_state(folder)
    assert expected.keys() == resumed.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], atol=0, rtol=0, msg=key)


def test_resume_from_a_generation_folder_is_refused(train_root, tmp_path, trained):
    generation = trained / "checkpoints" / "last"
    before = snapshot(trained)
    with pytest.raises(ValueError, match=re.escape(f"--resume: {generation} is a checkpoint generation; give its "
                                                   "run folder (the folder above checkpoints/)")):
        run(train_argv(train_root, tmp_path / "out", "--iterations", "3", "--resume", str(generation)))
    assert snapshot(trained) == before


def test_a_copy_that_followed_the_links_is_refused_for_resume_but_loads(train_root, tmp_path, trained):
    copy = tmp_path / "copy" / RUN
    shutil.copytree(trained, copy)  # follows links: checkpoints/last becomes a folder
    assert not os.path.islink(copy / "checkpoints" / "last")
    assert load_model_folder(str(copy)).iteration == 3
    with pytest.raises(ValueError, match=re.escape(f"{copy}/checkpoints/last is a folder, not a link to a "
                                                   "generation: this run folder was copied without its links")):
        run(train_argv(train_root, tmp_path / "out", "--iterations", "3", "--resume", str(copy)))


def test_amp_may_change_on_resume(train_root, tmp_path, trained):
    run(train_argv(train_root, tmp_path / "out", "--iterations", "3", "--amp", "fp16", "--resume"))
    log = (trained / "out.txt").read_text()
    assert "changed: --amp none -> fp16" in log
    assert "resume: --amp fp16 starts a new loss scale; the checkpoint was saved without one" in log
    assert json.loads((trained / "args.json").read_text())["resume_changes"][0]["settings"] == {
        "amp": {"checkpoint": "none", "now": "fp16"}}
