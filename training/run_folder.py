"""The run folder: its name (as the authors name it), creation without overwriting, saved arguments."""
import argparse
import json
import os
from typing import Optional, Tuple

import yaml

from training.state import TRAIN_STATE_FILE
from utils.atomic_files import atomic_write_text
from utils.distributed import broadcast_object, is_main_process


def run_folder_name(args: argparse.Namespace) -> str:
    """`<dataset>[_<target>]_<network>_rel_transformer[_<suffix>]`, the authors' naming."""
    parts = [args.dataset]
    if args.target:
        parts.append(args.target)
    parts += [args.network, "rel_transformer"]
    if args.suffix:
        parts.append(args.suffix)
    return "_".join(parts)


def _decide_run_folder(args: argparse.Namespace) -> Tuple[str, Optional[str]]:
    """(folder to write, folder to resume from or None); raises on an impossible resume."""
    base = os.path.join(args.checkpoint_folder_path, run_folder_name(args))
    if args.resume is not None:
        folder = base if args.resume == "auto" else args.resume
        state = os.path.join(folder, TRAIN_STATE_FILE)
        if not os.path.isfile(state):
            raise FileNotFoundError(f"--resume: no {TRAIN_STATE_FILE} in {folder!r}; "
                                    "a run folder written by this project's training is expected")
        return folder, folder
    if args.auto_resume:
        # Every attempt of a restarted job must use the same folder, also when an attempt died before
        # its first checkpoint: a fresh `<base>_<n>` would hide later checkpoints from later attempts.
        has_state = os.path.isfile(os.path.join(base, TRAIN_STATE_FILE))
        return base, (base if has_state else None)
    # Never overwrite an earlier run: the first free `<base>_<n>` is used instead.
    folder, n = base, 1
    while os.path.exists(folder):
        folder = f"{base}_{n}"
        n += 1
    return folder, None


def prepare_run_folder(args: argparse.Namespace) -> Tuple[str, Optional[str]]:
    """Decide the run folder on rank 0, create it there, and give every rank the same answer."""
    decision: Tuple[Optional[str], Optional[str], Optional[str]] = (None, None, None)
    if is_main_process():
        try:
            folder, resume_from = _decide_run_folder(args)
            os.makedirs(folder, exist_ok=True)
            decision = (folder, resume_from, None)
        except (OSError, ValueError) as error:
            decision = (None, None, f"{type(error).__name__}: {error}")
    # Broadcast the error too, so that every rank stops with the same message instead of hanging.
    folder, resume_from, error = broadcast_object(decision)
    if error is not None:
        raise RuntimeError(error)
    return folder, resume_from


def save_args(folder: str, args: argparse.Namespace) -> None:
    """The resolved arguments as `args.json` and `args.yaml` (rank 0 only)."""
    if not is_main_process():
        return
    plain = {key: (str(value) if not isinstance(value, (int, float, str, bool, type(None), list)) else value)
             for key, value in sorted(vars(args).items())}
    atomic_write_text(os.path.join(folder, "args.json"), json.dumps(plain, indent=2) + "\n")
    atomic_write_text(os.path.join(folder, "args.yaml"), yaml.safe_dump(plain, sort_keys=True))
