"""Training path of train.py on a tiny generated Folder data set (CPU, random init)."""
import contextlib
import dataclasses
import json
import math
import os
import re
import signal

import numpy as np
import pytest
import torch
from PIL import Image

import train
from datasets.image_lists import DataError
from models.checkpoint import load_model_folder
from training.settings import (
    Augmentation, DataSettings, ModelSettings, Objective, Optimisation, PeriodicEvalSettings, ProcessSettings,
    ResumeSettings, RunSettings, Schedule, TrainingSettings,
)
from training.state import TRAIN_STATE_FILE
from training.stopping import TrainingInterrupted


@pytest.fixture
def train_root(image_tree, tmp_path):
    """Three colour-coded classes of four 20-px images."""
    return image_tree({"train/a": 4, "train/b": 4, "train/c": 4}, root=tmp_path / "data", size=20) / "train"


def train_argv(train_dir, out, *extra):
    return ["--dataset", "Folder", "--train_dir", str(train_dir), "--checkpoint_folder_path", str(out),
            "--image_size", "32", "--batch_size", "8", "--neg_to_pos_ratio", "1", "--transf_depth", "1",
            "--backbone_weights", "none", "--num_workers", "0", "--device", "cpu", "--warmup", "1",
            "--log_period", "3", "--save_period", "3", "--eval_period", "1000", *extra]


def run(argv):
    """train.py's parse (with the record of the flags given) and main, in this process."""
    args = train.parse_command_line(argv)
    train.main(args)
    return args


def final_state(folder):
    state = torch.load(os.path.join(folder, TRAIN_STATE_FILE), weights_only=False)
    return {**{f"b.{k}": v for k, v in state["backbone"].items()},
            **{f"r.{k}": v for k, v in state["relational"].items()}}


def test_run_writes_authors_files_state_logs_and_tensorboard(train_root, tmp_path):
    out = tmp_path / "out"
    run(train_argv(train_root, out, "--iterations", "4"))
    folder = out / "Folder_resnet18_rel_transformer"
    for name in ("feature_extractor.pkl", "cls_rel.pkl", "last_checkpoint.txt", TRAIN_STATE_FILE,
                 "args.json", "args.yaml", "out.txt"):
        assert (folder / name).is_file(), name
    assert (folder / "last_checkpoint.txt").read_text().strip() == "4"
    assert any(f.startswith("events") for f in os.listdir(folder / "tensorboard"))
    log = (folder / "out.txt").read_text()
    assert "it 3/4" in log and "acc_same" in log
    # Each log line reports the job's throughput and the time left.
    line = next(line for line in log.splitlines() if "it 3/4" in line)
    assert re.search(r" \d+ pairs/s  eta \d\d:\d\d:\d\d$", line), line
    # The last line says where the run is and how much disk it took.
    assert re.search(r"done in [\d.]+ s; run folder .*Folder_resnet18_rel_transformer \([\d.]+ MB\)$",
                     log.strip().splitlines()[-1])
    assert json.loads((folder / "args.json").read_text())["iterations"] == 4
    model = load_model_folder(str(folder))
    assert model.objective == "L2" and model.iteration == 4
    # One generation per save; the one of iteration 3 is pruned once `last` names iteration 4.
    assert sorted(os.listdir(folder / "checkpoints")) == ["it000004", "last"]
    assert os.readlink(folder / "checkpoints" / "last") == "it000004"
    assert model.source == str(folder / "checkpoints" / "it000004")
    for name in ("feature_extractor.pkl", "cls_rel.pkl", "last_checkpoint.txt", TRAIN_STATE_FILE):
        assert os.readlink(folder / name) == os.path.join("checkpoints", "last", name)
    assert not [p for p in folder.rglob(".tmp*")]
    # A second run never overwrites the first one.
    run(train_argv(train_root, out, "--iterations", "1"))
    assert (out / "Folder_resnet18_rel_transformer_1" / "cls_rel.pkl").is_file()


@contextlib.contextmanager
def before_each_step(action):
    """Call action(n, optimizer) before the n-th optimiser step taken inside the block (torch's global hook)."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    steps = []

    def hook(optimizer, *_):
        steps.append(1)
        action(len(steps), optimizer)

    handle = register_optimizer_step_pre_hook(hook)
    try:
        yield steps
    finally:
        handle.remove()


def interrupt_at(iteration, signum=signal.SIGINT, repeat=1):
    """Within the block, send this process `signum` (`repeat` times) during `iteration` of a fresh run.

    As Ctrl-C or a scheduler would: from the outside, at the optimiser step of that iteration.
    """
    def send(step, optimizer):
        if step == iteration:
            for _ in range(repeat):
                os.kill(os.getpid(), signum)

    return before_each_step(send)


def test_resume_gives_the_uninterrupted_weights(train_root, tmp_path):
    straight = tmp_path / "straight"
    run(train_argv(train_root, straight, "--iterations", "6", "--optimizer", "lars"))
    split = tmp_path / "split"
    # Interrupted during iteration 5: it stops there, and the checkpoint of iteration 3 is the last one.
    message = r"^interrupted by SIGINT at iteration 5; last checkpoint: iteration 3 \(.*checkpoints/it000003\)$"
    with interrupt_at(5), pytest.raises(TrainingInterrupted, match=message):
        run(train_argv(train_root, split, "--iterations", "6", "--optimizer", "lars"))
    run(train_argv(train_root, split, "--iterations", "6", "--optimizer", "lars", "--resume"))
    expected = final_state(straight / "Folder_resnet18_rel_transformer")
    resumed = final_state(split / "Folder_resnet18_rel_transformer")
    assert expected.keys() == resumed.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], atol=1e-6, rtol=0, msg=key)


BASE_LR = 0.008


@pytest.mark.parametrize("schedule, expected", [
    # Warm-up over 4 iterations (1-based i: lr * i / 4), then x0.1 every 5 iterations counted from the first.
    (["--warmup", "4", "--step_after", "5", "--iterations", "7"],
     [BASE_LR * i / 4 for i in (1, 2, 3, 4)] + [BASE_LR, BASE_LR * 0.1, BASE_LR * 0.1]),
    # Warm-up over 2 iterations, then cosine from lr at iteration 3 to 0 after iteration 6.
    (["--warmup", "2", "--lr_schedule", "cosine", "--iterations", "6"],
     [BASE_LR / 2, BASE_LR] + [BASE_LR * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in (0, 1, 2, 3)]),
])
def test_the_optimizer_steps_with_the_scheduled_learning_rate(train_root, tmp_path, schedule, expected):
    """The lr each optimiser step really used (read by torch's step hook) follows the schedule's formula."""
    applied = []
    with before_each_step(lambda step, optimizer: applied.append([g["lr"] for g in optimizer.param_groups])):
        run(train_argv(train_root, tmp_path / "out", "--learning_rate", str(BASE_LR), "--log_period", "100",
                       "--save_period", "100", *schedule))
    assert len(applied) == len(expected)
    for iteration, (lrs, lr) in enumerate(zip(applied, expected), start=1):
        assert lrs == [pytest.approx(lr, rel=1e-12, abs=1e-15)] * len(lrs), f"iteration {iteration}"


def test_loss_falls(tmp_path):
    """A few dozen SGD steps on three visually distinct classes bring the loss well down."""
    rng = np.random.default_rng(0)
    root = tmp_path / "distinct"
    for name in ("dark", "bright", "stripes"):
        (root / name).mkdir(parents=True)
        for i in range(6):
            if name == "dark":
                pixels = rng.integers(0, 60, (20, 20, 3))
            elif name == "bright":
                pixels = rng.integers(195, 256, (20, 20, 3))
            else:
                pixels = np.repeat(((np.arange(20)[:, None] % 4 < 2) * np.ones((1, 20)) * 255)[..., None], 3, 2)
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")
    out = tmp_path / "out"
    # A gentle sigmoid (c=1) and no colour augmentation: from random init, the authors' c=10 needs
    # far more steps before the loss moves (see docs/demo.md).
    run(train_argv(root, out, "--iterations", "40", "--batch_size", "16", "--optimizer", "sgd",
                   "--learning_rate", "0.03", "--warmup", "5", "--clip_grad", "1.0", "--head_init", "zero",
                   "--sigmoid_compression", "1", "--prob_jitter", "0", "--random_grayscale", "0",
                   "--log_period", "5"))
    log = (out / "Folder_resnet18_rel_transformer" / "out.txt").read_text()
    losses = [float(x) for x in re.findall(r"loss ([0-9.]+)", log)]
    accuracies = [float(x) for x in re.findall(r" acc ([0-9.]+)", log)]
    assert len(losses) == 8
    assert losses[0] == pytest.approx(1.0, abs=0.05)  # a zero head outputs 0: loss (e/2)^2 = 1
    assert losses[-1] < 0.6 * losses[0], losses
    assert accuracies[-1] > 0.75, accuracies


@pytest.mark.parametrize("extra, message", [
    (["--warmup", "10", "--iterations", "5"], r"^--warmup 10 is longer than the whole run \(--iterations 5\)$"),
    (["--batch_size", "100", "--iterations", "2"], "larger than one pass"),
    (["--resume", "--iterations", "2"], "checkpoint.pth"),
    (["--resume", "--pretrained", "elsewhere"], "^--resume and --pretrained exclude each other$"),
])
def test_bad_training_input_fails_before_writing(train_root, tmp_path, extra, message):
    out = tmp_path / "out"
    with pytest.raises(Exception, match=message):
        run(train_argv(train_root, out, *extra))
    written = [p.name for p in out.iterdir()] if out.exists() else []
    assert [name for name in written if name != ".cache"] == []


def test_bad_training_data(image_tree, tmp_path):
    one_class = image_tree({"only/a": 3}, root=tmp_path / "d1") / "only"
    with pytest.raises(DataError, match="found 1 in .*: with fewer, no negative pairs exist"):
        run(train_argv(one_class, tmp_path / "out1", "--iterations", "2"))
    empty_class = image_tree({"two/a": 3}, root=tmp_path / "d2") / "two"
    (empty_class / "b").mkdir()
    with pytest.raises(DataError, match=re.escape(f"class folder {empty_class / 'b'} contains no images")):
        run(train_argv(empty_class, tmp_path / "out2", "--iterations", "2"))
    with pytest.raises(DataError, match=re.escape(f"training folder {tmp_path / 'nowhere'} does not exist")):
        run(train_argv(tmp_path / "nowhere", tmp_path / "out3", "--iterations", "2"))
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out3").exists()


SETTINGS_TYPES = (DataSettings, Augmentation, ModelSettings, Objective, Schedule, Optimisation, RunSettings,
                  ResumeSettings, ProcessSettings, PeriodicEvalSettings, TrainingSettings)


def resolved_args(argv):
    """train.py's flags as main() leaves them before training (device resolved, one process)."""
    args = train.parse_command_line(argv)
    args.device, args.distributed, args.world_size = torch.device("cpu"), False, 1
    return args


def test_settings_are_built_once_from_the_flags(train_root, tmp_path):
    args = resolved_args(train_argv(train_root, tmp_path, "--iterations", "7", "--suffix", "s1", "--clip_grad", "2.5",
                                    "--accum_steps", "3"))
    settings = TrainingSettings.from_args(args)
    assert [type(part) for part in (settings.data, settings.augmentation, settings.model, settings.objective,
                                    settings.optimisation, settings.optimisation.schedule, settings.run,
                                    settings.resume, settings.process, settings.evaluation)] == [
        DataSettings, Augmentation, ModelSettings, Objective, Optimisation, Schedule, RunSettings, ResumeSettings,
        ProcessSettings, PeriodicEvalSettings]
    assert settings.data == DataSettings(dataset="Folder", target=None, data_root=args.data_root, path_to_txt=None,
                                         train_dir=str(train_root), neg_to_pos_ratio=1, class_balancing=True,
                                         batch_size=8, num_workers=0, seed=0, load_truncated_images=False)
    assert settings.optimisation == Optimisation(
        optimizer="lars", momentum=0.9, weight_decay=5e-4, accum_steps=3, clip_grad=2.5, amp="none",
        schedule=Schedule(learning_rate=0.008, warmup=1, step_after=13000, lr_schedule="step", iterations=7))
    assert settings.run == RunSettings(parent=str(tmp_path), name="Folder_resnet18_rel_transformer_s1",
                                       log_period=3, save_period=3, eval_period=1000, save_on_interrupt=False)
    assert settings.process == ProcessSettings(device=torch.device("cpu"), distributed=False, sync_bn=False)
    assert settings.evaluation.scoring.image_size == 32 and settings.evaluation.dataset is None
    # What args.json and checkpoint.pth record: every flag as parsed, read-only.
    assert dict(settings.flags) == vars(args)
    with pytest.raises(TypeError):
        settings.flags["iterations"] = 8


def test_settings_have_no_defaults_of_their_own():
    """train.py's parser holds every default; a settings field with one would be a second copy."""
    for cls in SETTINGS_TYPES:
        assert [f.name for f in dataclasses.fields(cls)
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING] == [], cls


def test_the_device_must_be_resolved_before_training(train_root, tmp_path):
    args = resolved_args(train_argv(train_root, tmp_path))
    args.device = "cpu"  # as parsed, before init_distributed_mode
    with pytest.raises(TypeError, match=r"^device must be a torch.device, got 'cpu' \(str\); "
                                        r"utils.distributed.init_distributed_mode resolves --device before training$"):
        TrainingSettings.from_args(args)


def test_num_workers_default_depends_on_device():
    parser = train.get_args_parser()
    for device, expected in (("cpu", 0), ("cuda:1", train.CUDA_NUM_WORKERS)):
        args = parser.parse_args([])
        args.device = torch.device(device)  # as init_distributed_mode leaves it
        train.resolve_num_workers(args)
        assert args.num_workers == expected
    args = parser.parse_args(["--num_workers", "3"])
    args.device = torch.device("cpu")
    train.resolve_num_workers(args)
    assert args.num_workers == 3
    # A negative count never gets this far: the parser refuses it (tests/test_cli.py).
