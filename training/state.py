"""The full training state (`checkpoint.pth`) and the run folder's checkpoint generations.

Each save writes one generation, `<run>/checkpoints/it<N>/` (the authors' three files and
`checkpoint.pth`), under a temp name that is renamed into place once every file is on disk; then
`checkpoints/last` is switched to it by one atomic rename of a fresh link. `checkpoints/best` marks
the generation of the best periodic evaluation. Generations that neither link names are pruned.
The run folder's own `feature_extractor.pkl`, `cls_rel.pkl`, `last_checkpoint.txt` and
`checkpoint.pth` are fixed links into `checkpoints/last`, for the authors' tools.
"""
import contextlib
import errno
import itertools
import json
import math
import os
import pickle
import shutil
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from models.checkpoint import (
    BEST_LINK, CHECKPOINTS_DIR, GENERATION_FILES, GENERATION_NAME, LAST_LINK, TRAIN_STATE_FILE, CheckpointError,
    atomic_torch_save, save_model_folder,
)  # TRAIN_STATE_FILE is also imported from here by the tests and tools
from evaluation.scorers import scorer_flags
from models.resend import ReSeND
from utils.atomic_files import atomic_write_text, fsync_dir, temp_name
from utils.distributed import broadcast_object, is_main_process
from utils.seeding import capture_rng_state

SCORE_FILE = "score.json"  # in a generation that was once the best: what its evaluation scored
_REQUIRED_STATE = ("backbone", "relational", "optimizer", "scaler", "iteration", "pairs_seen", "rng")

# What a resume compares between the checkpoint's arguments and the new ones (see resume_differences).
# Must match: anything that changes the model, the data, the objective, the optimiser or the schedule.
RESUME_MUST_MATCH = (
    "dataset", "target", "train_dir", "path_to_txt", "network", "backbone_weights", "transf_depth",
    "transf_n_heads", "head_init", "loss_function", "sigmoid_compression", "sigmoid_expansion", "image_size",
    "min_scale", "max_scale", "random_horiz_flip", "jitter", "prob_jitter", "random_grayscale",
    "neg_to_pos_ratio", "class_balancing", "seed", "optimizer", "learning_rate", "momentum", "weight_decay",
    "warmup", "step_after", "lr_schedule", "iterations", "clip_grad",
)
# May change, and a change is logged and recorded in args.json: the position in the pair stream is
# kept in pairs, so batch size, accumulation and the number of processes can change; numerics
# settings (amp, sync_bn) and the data's location too; --pretrained only chose the initial weights,
# which the checkpoint's replace.
RESUME_MAY_CHANGE = (
    "data_root", "batch_size", "accum_steps", "world_size", "amp", "sync_bn", "num_workers", "pretrained",
    "dist_backend", "load_truncated_images", "no_tf32", "device_augment",
)
# Not compared: how this process runs and reports, not what it trains (with the scorers' flags: see
# resume_free).
RESUME_FREE = (
    "checkpoint_folder_path", "suffix", "resume", "auto_resume", "resume_override", "save_on_interrupt",
    "log_period", "save_period", "eval_period", "eval_dataset", "eval_target", "source_dir", "target_dir",
    "eval_batch_size", "few_shot", "most_significant_prototypes", "knn_distance_evaluator", "evaluator",
    "backbone_only", "only_eval", "export", "demo", "local_rank", "distributed", "device",
    # The periodic evaluation's backbone, like --eval_dataset and --evaluator: what is scored, not what
    # is trained. As with them, `best` compares the scores of before and after a change.
    "backbone_checkpoint",
    "dist_timeout_minutes", "debug_errors", "quiet", "tag",
    "explicit_flags",  # which flags were typed (train.parse_command_line), not their values
)
_PATH_ARGS = ("train_dir", "path_to_txt", "backbone_weights", "data_root", "pretrained")


def resume_free() -> Tuple[str, ...]:
    """RESUME_FREE and the flags of the scorers registered now (read per comparison: late registrations count).

    A scorer's hyperparameter flags only change how the periodic evaluation scores.
    """
    return RESUME_FREE + tuple(scorer_flags())


class CheckpointWriteError(OSError):
    """A checkpoint generation could not be written (full disk, read-only folder); the previous one is intact."""


class ResumeMismatchError(ValueError):
    """A resume whose arguments change what the checkpoint was trained with, without --resume_override."""


# ---------------------------------------------------------------- checkpoint.pth

def training_state(model: ReSeND, optimizer: torch.optim.Optimizer, scaler: "torch.amp.GradScaler",
                   iteration: int, pairs_seen: int, flags: Mapping[str, Any]) -> Dict[str, Any]:
    """The contents of `checkpoint.pth`: everything a resume needs to continue bit for bit."""
    return {
        "backbone": model.backbone.state_dict(),
        "relational": model.relational.state_dict(),
        "optimizer": optimizer.state_dict(),  # includes the momentum buffers
        "scaler": scaler.state_dict(),
        "iteration": iteration,
        "pairs_seen": pairs_seen,  # position in the pair stream, summed over processes
        "rng": capture_rng_state(),
        # The lr is a pure function of the iteration and the schedule flags recorded here, which
        # resume_differences compares with a resume's flags (a changed schedule is refused).
        "args": {key: value for key, value in flags.items()
                 if isinstance(value, (int, float, str, bool, type(None)))},
    }


def find_resume_state(folder: str) -> Optional[str]:
    """The `checkpoint.pth` a resume of `folder` reads: in `checkpoints/last` (resolved once), or an older
    run folder's flat one; None when the folder holds neither."""
    link = os.path.join(folder, CHECKPOINTS_DIR, LAST_LINK)
    if os.path.lexists(link) and not os.path.islink(link):
        # A copy that followed the links: new saves could not switch `last`, and the copied top-level
        # files would no longer follow it.
        raise CheckpointError(f"{link} is a folder, not a link to a generation: this run folder was copied "
                              "without its links; copy it again keeping them (cp -a, rsync -a, "
                              "shutil.copytree(..., symlinks=True)) to resume it, or load it with --only_eval")
    if os.path.lexists(link):
        path = os.path.join(os.path.realpath(link), TRAIN_STATE_FILE)
        if not os.path.isfile(path):
            raise CheckpointError(f"{link} points to a generation without {TRAIN_STATE_FILE}: {path}")
        return path
    flat = os.path.join(folder, TRAIN_STATE_FILE)
    if os.path.isfile(flat) and not os.path.islink(flat):
        return flat
    return None


def load_training_state(path: str, device: torch.device, mmap: bool = False) -> Dict[str, Any]:
    """Read a `checkpoint.pth` (it holds RNG states, so weights_only=False); mmap: tensors stay on disk."""
    if not os.path.isfile(path):
        raise CheckpointError(f"training state not found: {path}")
    try:
        # Only files this project wrote are read here (the run folder of a resumed run).
        state = torch.load(path, map_location=device, weights_only=False, mmap=mmap)
    # torch.load reports corrupt input with many unrelated types (UnpicklingError, EOFError, ...).
    except Exception as exc:
        raise CheckpointError(f"cannot read {path} as a training state: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    absent = [key for key in _REQUIRED_STATE if not isinstance(state, dict) or key not in state]
    if absent:
        raise CheckpointError(f"{path} is not a training state of this project: it lacks {absent}")
    return state


# ---------------------------------------------------------------- resume arguments

def _same(name: str, old: Any, new: Any) -> bool:
    """Equal values; paths also when they name the same file."""
    if old == new:
        return True
    return (name in _PATH_ARGS and isinstance(old, str) and isinstance(new, str)
            and os.path.realpath(old) == os.path.realpath(new))


def resume_differences(stored: Mapping[str, Any], flags: Mapping[str, Any], unrecorded_differ: bool = True
                       ) -> Tuple[Dict[str, Tuple[Any, Any]], Dict[str, Tuple[Any, Any]]]:
    """(differences a resume refuses, differences it accepts), each {name: (checkpoint's, new)}.

    A setting the checkpoint did not record counts as a difference (unless unrecorded_differ is
    False); one that neither RESUME_MAY_CHANGE nor resume_free()
    classifies is refused (unless --resume_override is given), as if it changed the model.
    """
    refused: Dict[str, Tuple[Any, Any]] = {}
    accepted: Dict[str, Tuple[Any, Any]] = {}
    free = resume_free()
    for name, new in sorted(flags.items()):
        if name in free:
            continue
        if not isinstance(new, (int, float, str, bool, type(None))):
            new = str(new)
        old = stored.get(name, _NOT_RECORDED)
        if old is _NOT_RECORDED and not unrecorded_differ:
            continue
        if old is not _NOT_RECORDED and _same(name, old, new):
            continue
        (accepted if name in RESUME_MAY_CHANGE else refused)[name] = (old, new)
    return refused, accepted


class _NotRecorded:
    """Marker for a setting the checkpoint's arguments do not hold."""

    def __repr__(self) -> str:
        return "(not recorded)"


_NOT_RECORDED = _NotRecorded()


def _show_value(value: Any) -> str:
    """A setting as typed on the command line ('' and values with spaces quoted)."""
    if isinstance(value, str) and (value == "" or " " in value):
        return repr(value)
    return str(value) if value is not _NOT_RECORDED else repr(value)


def format_differences(differences: Dict[str, Tuple[Any, Any]]) -> str:
    """`--flag old -> new, ...` on one line."""
    return ", ".join(f"--{name} {_show_value(old)} -> {_show_value(new)}" for name, (old, new) in differences.items())


def recorded_differences(differences: Dict[str, Tuple[Any, Any]]) -> Dict[str, Dict[str, Any]]:
    """The differences as JSON: {name: {"checkpoint": old, "now": new}} (unrecorded old values as null)."""
    return {name: {"checkpoint": None if old is _NOT_RECORDED else old, "now": new}
            for name, (old, new) in differences.items()}


# ---------------------------------------------------------------- generations

def generation_name(iteration: int) -> str:
    """`it000300`: generation folders sort by iteration."""
    return f"it{int(iteration):06d}"


def linked_generation(folder: str, link: str = LAST_LINK) -> Optional[str]:
    """The generation folder `checkpoints/<link>` names (resolved), or None when the link does not exist."""
    path = os.path.join(folder, CHECKPOINTS_DIR, link)
    return os.path.realpath(path) if os.path.lexists(path) else None


def switch_link(checkpoints: str, link: str, generation: str) -> None:
    """Point `checkpoints/<link>` at generation `generation` (a name in `checkpoints`) with one atomic rename."""
    temp = os.path.join(checkpoints, temp_name())
    os.symlink(generation, temp)
    try:
        os.replace(temp, os.path.join(checkpoints, link))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp)
        raise
    fsync_dir(checkpoints)


def link_top_level_names(folder: str) -> None:
    """`<folder>/<file>` -> `checkpoints/last/<file>` for each generation file (the authors' tools read these).

    Created once; the regular files of an older run folder of this project (a resumed flat
    checkpoint, superseded by the generation just written) are replaced by the links.
    """
    for name in GENERATION_FILES:
        path = os.path.join(folder, name)
        target = os.path.join(CHECKPOINTS_DIR, LAST_LINK, name)
        if os.path.islink(path) and os.readlink(path) == target:
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            raise CheckpointError(f"{path} is a folder; a link to {target} belongs there")
        temp = os.path.join(folder, temp_name())
        os.symlink(target, temp)
        try:
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(temp)
            raise
    fsync_dir(folder)


def prune_generations(folder: str) -> List[str]:
    """Delete the generations that neither `last` nor `best` names; returns their paths."""
    checkpoints = os.path.join(folder, CHECKPOINTS_DIR)
    last = linked_generation(folder, LAST_LINK)
    if last is None:
        return []  # without `last` no generation is known to be complete: delete nothing
    keep = {last, linked_generation(folder, BEST_LINK)}
    pruned = []
    for name in sorted(os.listdir(checkpoints)):
        path = os.path.join(checkpoints, name)
        if (GENERATION_NAME.match(name) and os.path.isdir(path) and not os.path.islink(path)
                and os.path.realpath(path) not in keep):
            shutil.rmtree(path)
            pruned.append(path)
    return pruned


def _rename_into_place(staging: str, checkpoints: str, name: str) -> str:
    """Rename the staged generation to `name`, or `name.<k>` when a generation of that name exists."""
    for k in itertools.count():
        candidate = os.path.join(checkpoints, name if k == 0 else f"{name}.{k}")
        try:
            os.rename(staging, candidate)
        except OSError as error:
            # A non-empty folder of that name (an earlier attempt's) is never replaced.
            if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
                continue
            raise
        return candidate
    raise AssertionError("unreachable")


def _human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def free_space(path: str) -> str:
    """'<n> free on the filesystem of <path>' (or why that is unknown)."""
    try:
        return f"{_human_bytes(shutil.disk_usage(path).free)} free on the filesystem of {path}"
    except OSError as error:
        return f"free space on the filesystem of {path} unknown ({error.strerror or error})"


def _is_write_failure(error: BaseException) -> bool:
    """OSErrors, and torch.save's RuntimeError for a failed write (it does not raise an OSError then)."""
    return isinstance(error, OSError) or (isinstance(error, RuntimeError) and (
        "PytorchStreamWriter" in str(error) or "file write failed" in str(error)))


def write_generation(folder: str, model: ReSeND, optimizer: torch.optim.Optimizer,
                     scaler: "torch.amp.GradScaler", iteration: int, pairs_seen: int,
                     flags: Mapping[str, Any]) -> str:
    """Write generation `checkpoints/it<N>/` whole, switch `last` to it, prune; returns its path (rank 0).

    A failure (or a kill) at any point leaves `last` naming the previous, complete generation.
    """
    checkpoints = os.path.join(folder, CHECKPOINTS_DIR)
    previous = linked_generation(folder, LAST_LINK)
    target = os.path.join(checkpoints, generation_name(iteration))
    try:
        os.makedirs(checkpoints, exist_ok=True)
        staging = os.path.join(checkpoints, temp_name())
        os.mkdir(staging)
        try:
            save_model_folder(staging, model.backbone, model.relational, iteration)
            atomic_torch_save(training_state(model, optimizer, scaler, iteration, pairs_seen, flags),
                              os.path.join(staging, TRAIN_STATE_FILE))
            fsync_dir(staging)
            target = _rename_into_place(staging, checkpoints, generation_name(iteration))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        switch_link(checkpoints, LAST_LINK, os.path.basename(target))
        link_top_level_names(folder)
        prune_generations(folder)
    except (OSError, RuntimeError) as error:
        if not _is_write_failure(error):
            raise
        where = getattr(error, "filename", None)
        reason = (f"[Errno {error.errno}] {error.strerror}" if isinstance(error, OSError) and error.strerror
                  else f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
        now = linked_generation(folder, LAST_LINK)
        match = GENERATION_NAME.match(os.path.basename(now or ""))
        kept = ("no earlier checkpoint" if now is None else
                f"last checkpoint: {f'iteration {int(match.group(1))} ' if match else ''}({now})"
                + (", unchanged" if now == previous else ""))
        failure = CheckpointWriteError(
            f"cannot write checkpoint {target}" + (f" ({where})" if where and where != target else "")
            + f": {reason}; {free_space(checkpoints)}; {kept}")
        failure.errno = getattr(error, "errno", None)
        raise failure from error
    return target


def read_best_score(folder: str) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """(the best generation's score record, a warning when `best` exists but its score cannot be read)."""
    generation = linked_generation(folder, BEST_LINK)
    if generation is None:
        return None, None
    path = os.path.join(generation, SCORE_FILE)
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
        float(record["score"])
        return record, None
    except (OSError, ValueError, KeyError, TypeError) as error:
        return None, (f"cannot read the best checkpoint's score {path} ({type(error).__name__}: {error}); "
                      "the next periodic evaluation becomes the best")


def mark_best(folder: str, generation: str, record: Dict[str, Any]) -> None:
    """Record `record` (the evaluation's score) in `generation`, then switch `best` to it and prune."""
    atomic_write_text(os.path.join(generation, SCORE_FILE), json.dumps(record, indent=2) + "\n")
    switch_link(os.path.join(folder, CHECKPOINTS_DIR), BEST_LINK, os.path.basename(generation))
    prune_generations(folder)


def best_candidate(results: List[Any], iteration: int) -> Optional[Dict[str, Any]]:
    """Score of a periodic evaluation: mean AUROC of its first scorer over the targets; None if not finite."""
    if not results:
        return None
    scorer = results[0].scorer
    chosen = [result for result in results if result.scorer == scorer]
    score = sum(float(result.metrics["auroc"]) for result in chosen) / len(chosen)
    if not math.isfinite(score):
        return None
    return {"iteration": iteration, "score": score, "metric": "mean auroc", "scorer": scorer,
            "targets": [f"{result.dataset}/{result.target}" for result in chosen]}


# ---------------------------------------------------------------- one run's view

class Checkpoints:
    """The generations of one run folder as one training run sees them: rank 0 writes, every rank agrees."""

    def __init__(self, folder: str, last_path: Optional[str] = None, last_iteration: Optional[int] = None,
                 best: Optional[Dict[str, Any]] = None) -> None:
        self.folder = folder
        self.saved_by_this_run = False
        self.last_path = last_path  # the generation (or an older run folder) a resume started from
        self.last_iteration = last_iteration
        self.best = best

    def describe_last(self) -> str:
        """'last checkpoint: iteration N (<path>)', or that there is none."""
        if self.last_path is None:
            return "no checkpoint saved"
        return f"last checkpoint: iteration {self.last_iteration} ({self.last_path})"

    def save(self, model: ReSeND, optimizer: torch.optim.Optimizer, scaler: "torch.amp.GradScaler",
             iteration: int, pairs_seen: int, flags: Mapping[str, Any]) -> str:
        """Write a generation on rank 0; every rank returns its path or raises rank 0's write error."""
        outcome: Tuple[Optional[str], Optional[BaseException]] = (None, None)
        if is_main_process():
            try:
                outcome = (write_generation(self.folder, model, optimizer, scaler, iteration, pairs_seen, flags),
                           None)
            except Exception as error:  # shared, so that every rank stops with the same message
                outcome = (None, error)
        path, error = _shared_outcome(outcome)
        if error is not None:
            raise error
        self.last_path, self.last_iteration, self.saved_by_this_run = path, iteration, True
        return path

    def is_better(self, candidate: Optional[Dict[str, Any]]) -> bool:
        """Whether an evaluation's score beats the best so far (the first finite one always does)."""
        return candidate is not None and (self.best is None or candidate["score"] > float(self.best["score"]))

    def mark_best(self, candidate: Dict[str, Any]) -> None:
        """Switch `best` to the last generation (saved at the candidate's iteration) on rank 0."""
        if self.last_iteration != candidate["iteration"] or self.last_path is None:
            raise AssertionError(f"the best iteration {candidate['iteration']} must be saved first "
                                 f"(last saved: {self.last_iteration})")
        outcome: Tuple[Optional[str], Optional[BaseException]] = (None, None)
        if is_main_process():
            try:
                mark_best(self.folder, self.last_path, candidate)
            except Exception as error:
                outcome = (None, error)
        _, error = _shared_outcome(outcome)
        if error is not None:
            raise error
        self.best = candidate


def _shared_outcome(outcome: Tuple[Optional[str], Optional[BaseException]]
                    ) -> Tuple[Optional[str], Optional[BaseException]]:
    """Rank 0's (result, error) on every rank; rank 0 keeps its own error object (and traceback)."""
    value, error = outcome
    portable = error
    if error is not None:
        try:
            pickle.loads(pickle.dumps(error))
        except Exception:
            portable = RuntimeError(f"{type(error).__name__}: {error}")
    shared_value, shared_error = broadcast_object((value, portable))
    if is_main_process():
        return value, error
    return shared_value, shared_error
