"""Runs that end early: a non-finite loss or weight, SIGINT/SIGTERM, a second signal during a save."""
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from models.checkpoint import load_model_folder
from tests.test_run_folder import REPO_ROOT, RUN, entries, snapshot
from tests.test_training import interrupt_at, run, train_argv
from training.stopping import NonFiniteError, StopSignals, TrainingInterrupted


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


@pytest.mark.parametrize("log_period", ["3", "100"])  # checked at the log line, or only before the save
def test_a_nan_loss_stops_before_saving_and_keeps_the_last_good_generation(train_root, tmp_path, trained,
                                                                           log_period):
    before = snapshot(trained / "checkpoints")
    with pytest.raises(NonFiniteError) as caught:
        run(train_argv(train_root, tmp_path / "out", "--iterations", "9", "--learning_rate", "1e30",
                       "--log_period", log_period, "--resume", "--resume_override"))
    assert re.fullmatch(
        r"non-finite loss \(NaN or inf\) at iteration [45]: training stopped at iteration 6 without saving it; "
        rf"last checkpoint: iteration 3 \({re.escape(str(trained))}/checkpoints/it000003\); "
        r"lower --learning_rate or set --clip_grad", str(caught.value)), str(caught.value)
    assert snapshot(trained / "checkpoints") == before
    loaded = load_model_folder(str(trained))
    assert loaded.iteration == 3 and all(torch.isfinite(p).all() for p in loaded.relational.parameters())
    assert str(caught.value) in (trained / "out.txt").read_text()


def test_a_nan_before_the_first_checkpoint_leaves_no_run_folder(train_root, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(NonFiniteError, match=r"^non-finite loss \(NaN or inf\) at iteration \d: training stopped at "
                                             r"iteration 3 without saving it; no checkpoint saved; .*; run folder "
                                             f"{re.escape(str(out / RUN))} removed$"):
        run(train_argv(train_root, out, "--iterations", "6", "--learning_rate", "1e30"))
    assert entries(out) == []


def test_a_nan_run_exits_with_status_1_and_one_line(train_root, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "train.py", *train_argv(train_root, out, "--iterations", "3",
                                                                      "--learning_rate", "1e30")],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1, result.stderr[-3000:]
    assert re.fullmatch(r"error: non-finite loss \(NaN or inf\) at iteration \d: .* run folder .* removed\n",
                        result.stderr), result.stderr[-3000:]
    assert entries(out) == []


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_after_the_iteration_and_keeps_the_last_checkpoint(train_root, tmp_path, signum, code):
    out = tmp_path / "out"
    with interrupt_at(5, signum), pytest.raises(TrainingInterrupted) as caught:
        run(train_argv(train_root, out, "--iterations", "6"))
    folder = out / RUN
    assert str(caught.value) == (f"interrupted by {signum.name} at iteration 5; last checkpoint: iteration 3 "
                                 f"({folder}/checkpoints/it000003)")
    assert caught.value.exit_code == code
    assert load_model_folder(str(folder)).iteration == 3
    assert str(caught.value) in (folder / "out.txt").read_text()
    # The handlers are restored once training ends.
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_save_on_interrupt_saves_the_current_iteration(train_root, tmp_path):
    out = tmp_path / "out"
    message = r"^interrupted by SIGINT at iteration 5; last checkpoint: iteration 5 \(.*/checkpoints/it000005\)$"
    with interrupt_at(5), pytest.raises(TrainingInterrupted, match=message):
        run(train_argv(train_root, out, "--iterations", "6", "--save_on_interrupt"))
    folder = out / RUN
    assert load_model_folder(str(folder)).iteration == 5
    assert sorted(os.listdir(folder / "checkpoints")) == ["it000005", "last"]
    run(train_argv(train_root, out, "--iterations", "6", "--resume"))
    assert load_model_folder(str(folder)).iteration == 6
    assert f"resumed from {folder} at iteration 5" in (folder / "out.txt").read_text()


def test_an_interrupt_before_the_first_checkpoint_leaves_no_run_folder(train_root, tmp_path):
    out = tmp_path / "out"
    folder = re.escape(str(out / RUN))
    message = f"^interrupted by SIGINT at iteration 2; no checkpoint saved; run folder {folder} removed$"
    with interrupt_at(2), pytest.raises(TrainingInterrupted, match=message):
        run(train_argv(train_root, out, "--iterations", "6"))
    assert entries(out) == []


def test_a_second_signal_abandons_the_save_and_keeps_the_previous_generation(train_root, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(StopSignals, "REPEAT_AFTER_S", 0.0)  # the second one counts however soon it comes
    real_save = torch.save
    saves = []

    def save_then_signal(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) == 6:  # checkpoint.pth of the save at iteration 5 (three files per save)
            os.kill(os.getpid(), signal.SIGINT)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_signal)
    message = r"^interrupted by SIGINT at iteration 5; last checkpoint: iteration 3 \(.*/checkpoints/it000003\)$"
    with interrupt_at(5), pytest.raises(TrainingInterrupted, match=message):
        run(train_argv(train_root, out, "--iterations", "6", "--save_on_interrupt"))
    folder = out / RUN
    assert len(saves) == 6
    assert sorted(os.listdir(folder / "checkpoints")) == ["it000003", "last"]
    assert load_model_folder(str(folder)).iteration == 3


def test_a_signal_repeated_at_once_is_one_request(train_root, tmp_path):
    """Ctrl-C under torchrun: the terminal's SIGINT and the launcher's forwarded one arrive together."""
    out = tmp_path / "out"
    message = r"^interrupted by SIGINT at iteration 5; last checkpoint: iteration 5 \(.*/checkpoints/it000005\)$"
    with interrupt_at(5, repeat=2), pytest.raises(TrainingInterrupted, match=message):
        run(train_argv(train_root, out, "--iterations", "6", "--save_on_interrupt"))
