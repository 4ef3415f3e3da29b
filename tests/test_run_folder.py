"""Run folders: race-free creation, --auto_resume only into folders it may use, no folder left by a failed start,
stale temps of killed saves swept at the next start."""
import hashlib
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import train
from datasets.image_lists import DataError
from models.backbone import ResNetBackbone
from models.checkpoint import save_model_folder
from models.relational import RelationalTransformer
from tests.test_training import run, train_argv
from training.pair_stream import PairStream
from training.run_folder import RunFolderError, claim_run_folder
from training.settings import ResumeSettings, RunSettings
from training.state import Checkpoints
from utils.atomic_files import host_name
from utils.run_args import RunArgsError

REPO_ROOT = Path(__file__).resolve().parents[1]
RUN = "Folder_resnet18_rel_transformer"


@pytest.fixture
def train_root(image_tree, tmp_path):
    """Three colour-coded classes of four 20-px images."""
    return image_tree({"train/a": 4, "train/b": 4, "train/c": 4}, root=tmp_path / "data", size=20) / "train"


def snapshot(folder):
    """{relative path: sha256 or link target} of everything under `folder`."""
    result = {}
    for path in sorted(Path(folder).rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            result[key] = "-> " + os.readlink(path)
        elif path.is_file():
            result[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return result


def entries(out):
    """What a run left in --checkpoint_folder_path, besides the training lists' cache."""
    return sorted(name for name in os.listdir(out) if name != ".cache")


def claim_for(out, *extra):
    """claim_run_folder with the settings of train.py's flags for a Folder run under `out`."""
    args = train.get_args_parser().parse_args(
        ["--dataset", "Folder", "--checkpoint_folder_path", str(out), "--device", "cpu", *extra])
    return claim_run_folder(RunSettings.from_args(args), ResumeSettings.from_args(args), vars(args))


# ---------------------------------------------------------------- creation

def test_a_folder_created_between_check_and_create_is_not_shared(tmp_path, monkeypatch):
    """Another process creating `<base>` at the last moment makes this one take `<base>_1`."""
    base = tmp_path / RUN
    real_mkdir = os.mkdir

    def racing_mkdir(path, *args, **kwargs):
        if str(path) == str(base) and not base.exists():
            real_mkdir(path)  # the other process wins the race
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", racing_mkdir)
    claimed = claim_for(tmp_path)
    assert claimed.path == f"{base}_1" and claimed.created
    assert os.listdir(base) == []


def test_trainings_started_together_get_distinct_folders(tmp_path):
    start = threading.Barrier(8)
    claimed, errors = [], []

    def claim():
        try:
            start.wait()
            claimed.append(claim_for(tmp_path).path)
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert sorted(claimed) == sorted([str(tmp_path / RUN)] + [f"{tmp_path / RUN}_{n}" for n in range(1, 8)])


# ---------------------------------------------------------------- --auto_resume

def test_auto_resume_refuses_a_folder_holding_the_authors_files(train_root, tmp_path):
    out = tmp_path / "out"
    folder = out / RUN
    torch.manual_seed(0)
    save_model_folder(str(folder), ResNetBackbone("resnet18"),
                      RelationalTransformer(feat_dim=512, n_outputs=1, depth=1, embed_dim=32, n_heads=4), iteration=60)
    before = snapshot(folder)
    with pytest.raises(RunFolderError) as caught:
        run(train_argv(train_root, out, "--iterations", "2", "--auto_resume"))
    assert str(caught.value) == (
        f"--auto_resume: {folder} holds files this project's training did not write (cls_rel.pkl, "
        "feature_extractor.pkl, last_checkpoint.txt) and no checkpoint to resume; they are left untouched: "
        "move them elsewhere, or choose another --checkpoint_folder_path or --suffix")
    assert snapshot(folder) == before
    assert entries(out) == [RUN]


def test_auto_resume_refuses_the_leftovers_of_a_run_with_other_settings(train_root, tmp_path):
    out = tmp_path / "out"
    folder = out / RUN
    folder.mkdir(parents=True)
    (folder / "args.json").write_text('{"learning_rate": 0.5, "seed": 0}\n')
    with pytest.raises(RunFolderError, match=re.escape(f"--auto_resume: {folder}/args.json belongs to a run with "
                                                       "other settings (--learning_rate 0.5 -> 0.008")):
        run(train_argv(train_root, out, "--iterations", "2", "--auto_resume"))
    assert os.listdir(folder) == ["args.json"]


@pytest.mark.parametrize("content, message", [
    ('{"seed": 0', "cannot read the run's settings {}: Expecting ',' delimiter"),
    ("[0]", "{} should hold a JSON object of flags, got a list"),
])
def test_auto_resume_refuses_an_unreadable_args_json_naming_it(train_root, tmp_path, content, message):
    """The same reader, and the same message, as evaluation's (utils/run_args.py); the file is left as it was."""
    out = tmp_path / "out"
    folder = out / RUN
    folder.mkdir(parents=True)
    (folder / "args.json").write_text(content)
    with pytest.raises(RunArgsError, match=re.escape(message.format(folder / "args.json"))):
        run(train_argv(train_root, out, "--iterations", "2", "--auto_resume"))
    assert os.listdir(folder) == ["args.json"] and (folder / "args.json").read_text() == content


KILLED_ATTEMPT = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import train
real_rename = os.rename

def rename_then_die(src, dst):
    # SIGKILL just before the first generation is renamed into place: its staging folder stays.
    if os.path.basename(src).startswith(".tmp-"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_rename(src, dst)

os.rename = rename_then_die
train.main(train.get_args_parser().parse_args({argv!r}))
"""


def test_a_killed_attempt_s_folder_is_reused_and_its_temps_swept(train_root, tmp_path):
    out = tmp_path / "out"
    argv = train_argv(train_root, out, "--iterations", "3", "--auto_resume")
    killed = subprocess.run([sys.executable, "-c", KILLED_ATTEMPT.format(repo=str(REPO_ROOT), argv=argv)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    folder = out / RUN
    (staged,) = [p for p in (folder / "checkpoints").iterdir()]
    assert staged.name.startswith(f".tmp-{host_name()}-") and (staged / "checkpoint.pth").is_file()
    assert not os.path.lexists(folder / "checkpoints" / "last")
    # A temp file of a live writer (this test process) is left alone.
    live = folder / f".tmp_{host_name()}-{os.getpid()}-live0001.json"
    live.write_text("in progress")

    run(argv)

    assert not staged.exists() and live.read_text() == "in progress"
    assert sorted(os.listdir(folder / "checkpoints")) == ["it000003", "last"]
    log = (folder / "out.txt").read_text()
    assert f"removed 1 temp file(s) of killed saves: {staged}" in log
    assert entries(out) == [RUN]


# ---------------------------------------------------------------- failed starts

def test_a_corrupt_training_image_leaves_no_run_folder(train_root, tmp_path):
    bad = sorted((train_root / "b").iterdir())[1]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    out = tmp_path / "out"
    with pytest.raises(DataError, match=re.escape(str(bad))):
        run(train_argv(train_root, out, "--iterations", "3", "--batch_size", "24"))
    assert entries(out) == []


def test_a_failure_before_the_first_checkpoint_leaves_no_run_folder(train_root, tmp_path, monkeypatch):
    def failing_batches(self, start):
        raise RuntimeError("injected before the first save")
        yield  # a generator, as the real one

    monkeypatch.setattr(PairStream, "batches", failing_batches)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="^injected before the first save$"):
        run(train_argv(train_root, out, "--iterations", "3"))
    assert entries(out) == []


def test_a_failure_never_removes_a_folder_that_existed(train_root, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run(train_argv(train_root, out, "--iterations", "3"))
    folder = out / RUN
    before = {k: v for k, v in snapshot(folder).items() if not k.startswith(("out.txt", "tensorboard"))}

    def failing_save(self, *args, **kwargs):
        raise RuntimeError("injected in the first save")

    monkeypatch.setattr(Checkpoints, "save", failing_save)
    with pytest.raises(RuntimeError, match="injected in the first save"):
        run(train_argv(train_root, out, "--iterations", "6", "--resume", "--resume_override"))
    monkeypatch.undo()
    after = {k: v for k, v in snapshot(folder).items() if not k.startswith(("out.txt", "tensorboard", "args."))}
    assert after == {k: v for k, v in before.items() if not k.startswith("args.")}
    log = (folder / "out.txt").read_text()
    assert "training stopped at iteration 6: RuntimeError: injected in the first save" in log
