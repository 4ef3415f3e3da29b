"""The run folder: race-free creation under the name RunSettings gives, resume checks, the saved flag values."""
import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import yaml

from models.checkpoint import CHECKPOINTS_DIR, TRAIN_STATE_FILE
from training.settings import ResumeSettings, RunSettings
from training.state import (
    ResumeMismatchError, find_resume_state, format_differences, load_training_state, read_best_score,
    recorded_differences, resume_differences,
)
from utils.atomic_files import TempSweep, atomic_write_text, remove_stale_temps
from utils.distributed import broadcast_object, is_main_process
from utils.run_args import RUN_ARGS_FILE, read_run_args
# What an attempt of a run writes before its first checkpoint: --auto_resume may reuse a folder
# holding only these (and temp files); anything else was put there by someone else.
_WRITTEN_BEFORE_FIRST_CHECKPOINT = ("out.txt", RUN_ARGS_FILE, "args.yaml", "tensorboard", CHECKPOINTS_DIR, "eval")
# Lists in args.json that keep every earlier resume's differences, so that no old value is lost.
_HISTORY_KEYS = ("resume_overrides", "resume_changes")


class RunFolderError(ValueError):
    """The run folder cannot be used: foreign files, a file in the way (an unreadable args.json: RunArgsError)."""


@dataclass
class RunFolder:
    """Where a training run writes, and what it resumes from (decided on rank 0, shared with every rank)."""

    path: str
    created: bool  # this run made the folder: it may remove it again after a failed start
    resume_state: Optional[str] = None  # the checkpoint.pth a resume reads (in the resolved generation)
    resume_iteration: Optional[int] = None
    resume_generation: Optional[str] = None  # its generation folder (the run folder for an older flat one)
    overridden: Dict[str, Tuple[Any, Any]] = field(default_factory=dict)  # refused differences, overridden
    changed: Dict[str, Tuple[Any, Any]] = field(default_factory=dict)  # differences a resume accepts
    history: Dict[str, List[Any]] = field(default_factory=dict)  # resume records of the earlier args.json
    best: Optional[Dict[str, Any]] = None  # score record of checkpoints/best
    warnings: List[str] = field(default_factory=list)  # to log once the text log exists
    swept: TempSweep = field(default_factory=TempSweep)


def _history(folder: str) -> Dict[str, List[Any]]:
    """The resume records of the folder's args.json (empty when it has none)."""
    record = read_run_args(folder) or {}
    return {key: list(record.get(key, [])) for key in _HISTORY_KEYS}


def _resumed(folder: str, state_path: str, resume: ResumeSettings, flags: Mapping[str, Any], flag: str) -> RunFolder:
    """A resume of `folder` from `state_path`, after comparing the flags (nothing is written here)."""
    state = load_training_state(state_path, torch.device("cpu"), mmap=True)
    stored = state.get("args")
    refused, changed = resume_differences(stored if isinstance(stored, dict) else {}, flags)
    if refused and not resume.resume_override:
        raise ResumeMismatchError(
            f"{flag}: {state_path} was trained with other settings: {format_differences(refused)}; "
            "resume with the same flags, or add --resume_override to continue with the new ones "
            f"(recorded in {RUN_ARGS_FILE})")
    generation = os.path.dirname(state_path)
    best, warning = read_best_score(folder)
    return RunFolder(path=folder, created=False, resume_state=state_path, resume_iteration=int(state["iteration"]),
                     resume_generation=generation, overridden=refused, changed=changed, history=_history(folder),
                     best=best, warnings=[warning] if warning else [])


def _foreign_entries(folder: str) -> List[str]:
    """Entries of `folder` that no attempt of a run writes before its first checkpoint."""
    return sorted(name for name in os.listdir(folder)
                  if name not in _WRITTEN_BEFORE_FIRST_CHECKPOINT and not name.startswith(".tmp"))


def _reuse_for_auto_resume(folder: str, resume: ResumeSettings, flags: Mapping[str, Any]) -> RunFolder:
    """An existing folder without a checkpoint: reused only if an earlier attempt of this run left it."""
    if not os.path.isdir(folder):
        raise RunFolderError(f"--auto_resume: {folder} exists and is not a folder")
    foreign = _foreign_entries(folder)
    if foreign:
        raise RunFolderError(
            f"--auto_resume: {folder} holds files this project's training did not write ({', '.join(foreign)}) "
            "and no checkpoint to resume; they are left untouched: move them elsewhere, or choose another "
            "--checkpoint_folder_path or --suffix")
    earlier = read_run_args(folder)
    if earlier is not None:
        # Only what the earlier attempt recorded: an args.json of another version may hold fewer settings.
        refused, _ = resume_differences(earlier, flags, unrecorded_differ=False)
        if refused and not resume.resume_override:
            raise RunFolderError(
                f"--auto_resume: {os.path.join(folder, RUN_ARGS_FILE)} belongs to a run with other settings "
                f"({format_differences(refused)}) that saved no checkpoint; remove that folder or use "
                "another --suffix")
    return RunFolder(path=folder, created=False, history=_history(folder))


def _create_new(base: str) -> RunFolder:
    """The first of `<base>`, `<base>_1`, ... that this process creates itself (atomic mkdir, no check-then-create)."""
    n = 0
    while True:
        folder = base if n == 0 else f"{base}_{n}"
        try:
            os.mkdir(folder)
        except FileExistsError:
            n += 1
            continue
        return RunFolder(path=folder, created=True)


def claim_run_folder(run_settings: RunSettings, resume: ResumeSettings, flags: Mapping[str, Any]) -> RunFolder:
    """Decide (and create, if new) the run folder; every check runs before anything is written (rank 0).

    `flags` are the run's flag values, compared with those a resumed checkpoint recorded.
    """
    parent = run_settings.parent
    base = os.path.join(parent, run_settings.name)
    if resume.resume is not None:
        folder = base if resume.resume == "auto" else resume.resume
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"--resume: run folder {folder!r} does not exist ({TRAIN_STATE_FILE} expected)")
        if os.path.basename(os.path.dirname(os.path.realpath(folder))) == CHECKPOINTS_DIR:
            # Training there would turn a generation (perhaps `best`) into a run folder of its own.
            raise RunFolderError(f"--resume: {folder} is a checkpoint generation; give its run folder "
                                 f"(the folder above {CHECKPOINTS_DIR}/)")
        state_path = find_resume_state(folder)
        if state_path is None:
            raise FileNotFoundError(f"--resume: no {TRAIN_STATE_FILE} in {folder!r}; "
                                    "a run folder written by this project's training is expected")
        run = _resumed(folder, state_path, resume, flags, "--resume")
    elif resume.auto_resume:
        # Every attempt of a restarted job must use the same folder, also when an attempt died before
        # its first checkpoint: a fresh `<base>_<n>` would hide later checkpoints from later attempts.
        os.makedirs(parent, exist_ok=True)
        try:
            os.mkdir(base)
            return RunFolder(path=base, created=True)
        except FileExistsError:
            pass
        state_path = find_resume_state(base) if os.path.isdir(base) else None
        run = (_resumed(base, state_path, resume, flags, "--auto_resume") if state_path is not None
               else _reuse_for_auto_resume(base, resume, flags))
    else:
        os.makedirs(parent, exist_ok=True)
        return _create_new(base)
    # Only in a folder that existed before: temps of killed writers (this host, dead process) go.
    run.swept = remove_stale_temps(run.path)
    return run


def prepare_run_folder(run_settings: RunSettings, resume: ResumeSettings, flags: Mapping[str, Any]) -> RunFolder:
    """Claim the run folder on rank 0 and give every rank the same answer (or the same error)."""
    decision: Tuple[Optional[RunFolder], Optional[BaseException]] = (None, None)
    if is_main_process():
        try:
            decision = (claim_run_folder(run_settings, resume, flags), None)
        except (OSError, ValueError) as error:
            decision = (None, error)
    # The error is shared too, so that every rank stops with the same message instead of hanging.
    run, error = broadcast_object(decision)
    if error is not None:
        raise error
    return run


def remove_created_run_folder(run: RunFolder) -> bool:
    """Delete the run folder if this run created it (rank 0); a folder that existed before is never touched."""
    if not run.created or not is_main_process() or not os.path.isdir(run.path):
        return False
    shutil.rmtree(run.path)
    return True


def resume_record(run: RunFolder) -> Dict[str, List[Any]]:
    """The resume lists of args.json: the earlier ones plus this resume's differences, if any."""
    history = {key: list(run.history.get(key, [])) for key in _HISTORY_KEYS}
    for key, differences in (("resume_overrides", run.overridden), ("resume_changes", run.changed)):
        if differences:
            history[key].append({"iteration": run.resume_iteration, "checkpoint": run.resume_state,
                                 "settings": recorded_differences(differences)})
    return {key: value for key, value in history.items() if value}


def save_args(run: RunFolder, flags: Mapping[str, Any]) -> None:
    """The resolved flag values as `args.json` and `args.yaml`, with every resume's differences (rank 0 only)."""
    if not is_main_process():
        return
    plain: Dict[str, Any] = {
        key: (str(value) if not isinstance(value, (int, float, str, bool, type(None), list)) else value)
        for key, value in sorted(flags.items())}
    plain.update(resume_record(run))
    atomic_write_text(os.path.join(run.path, RUN_ARGS_FILE), json.dumps(plain, indent=2) + "\n")
    atomic_write_text(os.path.join(run.path, "args.yaml"), yaml.safe_dump(plain, sort_keys=True))


def describe_resume(run: RunFolder) -> Optional[str]:
    """The log line of a resume: where from, and what changed (None for a fresh run)."""
    if run.resume_state is None:
        return None
    line = f"resumed from {run.path} at iteration {run.resume_iteration} ({run.resume_generation})"
    if run.overridden:
        line += f"; --resume_override: {format_differences(run.overridden)}"
    if run.changed:
        line += f"; changed: {format_differences(run.changed)}"
    return line


def folder_size(folder: str) -> str:
    """The size of the files under `folder` (links not followed), e.g. '459 MB'."""
    size = float(sum(os.lstat(os.path.join(parent, name)).st_size
                     for parent, _, names in os.walk(folder) for name in names))
    if size < 1000:
        return f"{size:.0f} B"
    for unit in ("kB", "MB"):
        size /= 1000
        if size < 1000:
            return f"{size:.1f} {unit}"
    return f"{size / 1000:.1f} GB"
