"""Evaluation result groups: one folder per evaluation under `<folder>/eval/`, written whole.

A group is named by `--tag`, else `<dataset>_it<iteration>_<hash8>` (`<dataset>_it<iteration>_bb-<file
stem>_<hash8>` when the backbone came from a file of its own), where the hash covers every setting that
changes a number, the targets, the scorers and the kind of evaluation. It is written
into a private temporary folder in `eval/` (manifest last) and renamed into place in one step, so a
reader sees a complete group or none. Only a group with the same hash (an identical re-run) is ever
replaced; evaluations with other settings get other names and leave each other's groups alone.
"""
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

EVAL_DIR = "eval"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
KINDS = ("only_eval", "periodic")
# Record entries that say where things are rather than what was computed: not part of the hash, so
# that an identical re-run of a moved or re-linked folder still finds its own group.
# The backbone file's path is one of them; its content's SHA-256 (backbone_sha256) is hashed.
UNHASHED_KEYS = ("checkpoint", "loaded_from", "run_args", "overrides", "backbone_checkpoint", "backbone_loaded")
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# Private temporary names: `<prefix><host>_<pid>_<random>`; dot-names are never groups.
_PARTIAL, _REPLACED = ".partial_", ".replaced_"


class GroupError(OSError):
    """An evaluation group that cannot be written, or a name already taken by other results."""


@dataclass
class GroupInfo:
    """A complete group found on disk, with its manifest."""

    path: str
    manifest: Dict[str, Any]


def validate_tag(tag: str) -> str:
    """A --tag usable as a folder name: letters, digits, '.', '_', '-', not starting with '.'."""
    if not _TAG.match(tag):
        raise ValueError(f"--tag {tag!r} must be 1-100 letters, digits, '.', '_' or '-', starting with a "
                         "letter or digit")
    return tag


def settings_hash(kind: str, dataset: str, targets: Sequence[str], record: Mapping[str, Any]) -> str:
    """8 hex digits of SHA-256 over the kind, dataset, targets and every hashed setting (scorers included)."""
    if kind not in KINDS:
        raise ValueError(f"unknown evaluation kind {kind!r}; valid: {', '.join(KINDS)}")
    content = {"kind": kind, "dataset": dataset, "targets": list(targets),
               **{key: value for key, value in record.items() if key not in UNHASHED_KEYS}}
    text = json.dumps(content, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


def backbone_label(backbone_path: str) -> str:
    """`bb-<file stem>` for a group name: the stem in the characters a tag allows, at most 40 of them."""
    stem = os.path.splitext(os.path.basename(backbone_path))[0]
    return "bb-" + (re.sub(r"[^A-Za-z0-9._-]+", "-", stem)[:40] or "file")


def group_name(dataset: str, iteration: Optional[int], digest: str, tag: Optional[str] = None,
               backbone_path: Optional[str] = None) -> str:
    """`tag`, else `<dataset>_it<iteration>_<digest>` (`na` for an unknown iteration), with `bb-<file stem>_`
    before the digest when the backbone was read from `backbone_path`."""
    if tag is not None:
        return validate_tag(tag)
    backbone = "" if backbone_path is None else backbone_label(backbone_path) + "_"
    return f"{dataset}_it{'na' if iteration is None else iteration}_{backbone}{digest}"


def read_manifest(group: str) -> Optional[Dict[str, Any]]:
    """A group's manifest, or None when it has none or it cannot be read (not a group of this project)."""
    try:
        with open(os.path.join(group, MANIFEST_FILE), encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and "hash" in manifest else None


SLOT_LOOKS = 5  # looks at a name that holds a folder without a readable manifest before refusing it


def check_slot(eval_root: str, name: str, digest: str) -> None:
    """Refuse, before any scoring, a name already holding something other than this evaluation's group."""
    path = os.path.join(eval_root, name)
    # A concurrent identical run may move its group aside (and another put theirs in place) between
    # looking for the folder and reading its manifest: only a folder that stays without a readable
    # manifest over several looks is someone else's.
    for attempt in range(SLOT_LOOKS):
        if not os.path.lexists(path):
            return
        manifest = read_manifest(path)
        if manifest is not None:
            break
        time.sleep(0.01 * attempt)
    if manifest is None:
        raise GroupError(f"{path} exists and is not an evaluation group (no readable {MANIFEST_FILE}); "
                         "it is left as it is: choose another --tag or move it away")
    if manifest["hash"] != digest:
        raise GroupError(f"{path} holds an evaluation with other settings (hash {manifest['hash']}, this one "
                         f"{digest}); it is left as it is: choose another --tag or move it away")


def write_group(eval_root: str, name: str, manifest: Dict[str, Any],
                write_files: Callable[[str], List[str]]) -> str:
    """Write a group whole: `write_files(temp_folder)` (returns the file names), the manifest, one rename.

    Returns the group's path. Any failure raises GroupError naming the group and leaves no partial
    folder; the group it would have replaced (same hash) is kept.
    """
    final = os.path.join(eval_root, name)
    try:
        os.makedirs(eval_root, exist_ok=True)
        remove_stale_partials(eval_root)
        check_slot(eval_root, name, manifest["hash"])
        temp = tempfile.mkdtemp(dir=eval_root, prefix=_private_prefix(_PARTIAL))
    except GroupError:
        raise
    except OSError as error:
        raise GroupError(f"cannot write the evaluation group {final}: {_reason(error)}") from error
    try:
        files = sorted(write_files(temp))
        now = time.time()
        full = {**manifest, "format": MANIFEST_FORMAT, "name": name, "files": files,
                "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)), "written_unix": now}
        # The manifest is written last: a folder with a manifest holds every file it lists.
        with open(os.path.join(temp, MANIFEST_FILE), "w", encoding="utf-8") as out:
            out.write(json.dumps(full, indent=2) + "\n")
            out.flush()
            os.fsync(out.fileno())
        # mkdtemp makes an owner-only folder; results are as readable as any other output.
        os.chmod(temp, 0o755)
        _move_into_place(temp, final, manifest["hash"])
    except GroupError:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    except BaseException as error:
        shutil.rmtree(temp, ignore_errors=True)
        if isinstance(error, OSError):
            raise GroupError(f"cannot write the evaluation group {final}: {_reason(error)}") from error
        raise
    return final


# Rounds of "move the old group aside, rename ours in" before giving up on a name that keeps changing.
MOVE_ATTEMPTS = 50


def _move_into_place(temp: str, final: str, digest: str) -> None:
    """Rename `temp` to `final`; an existing group with the same hash is moved aside, then removed."""
    eval_root = os.path.dirname(final)
    # Several rounds: concurrent identical runs may put their groups in place between two steps.
    for _ in range(MOVE_ATTEMPTS):
        if not os.path.lexists(final):
            try:
                os.rename(temp, final)
                return
            except OSError as error:
                if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                continue
        check_slot(eval_root, os.path.basename(final), digest)
        aside = os.path.join(eval_root, _private_prefix(_REPLACED) + os.urandom(4).hex())
        try:
            os.rename(final, aside)
        except FileNotFoundError:
            continue  # another identical run moved it first
        try:
            os.rename(temp, final)
        except OSError as error:
            try:
                os.rename(aside, final)  # put the previous group back
            except OSError:
                # A concurrent identical run put its group in place meanwhile: the one set aside is
                # superseded by an equal one and would otherwise stay behind as a hidden folder.
                shutil.rmtree(aside, ignore_errors=True)
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            continue
        shutil.rmtree(aside, ignore_errors=True)
        return
    raise GroupError(f"{final} kept changing while this evaluation tried to write it (concurrent identical runs?)")


def _private_prefix(kind: str) -> str:
    """`<kind><host>_<pid>_`: lets a later run tell whether the writer of a leftover is still alive."""
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())
    return f"{kind}{host}_{os.getpid()}_"


def remove_stale_partials(eval_root: str) -> List[str]:
    """Remove temporary folders left by killed writers on this host (their process is gone); returns them."""
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())
    removed = []
    for entry in os.listdir(eval_root):
        match = re.match(rf"^(?:{re.escape(_PARTIAL)}|{re.escape(_REPLACED)}){re.escape(host)}_(\d+)_", entry)
        if match and not _process_alive(int(match.group(1))):
            shutil.rmtree(os.path.join(eval_root, entry), ignore_errors=True)
            removed.append(entry)
    return removed


def _process_alive(pid: int) -> bool:
    """Whether a process with this id exists (one owned by another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reason(error: OSError) -> str:
    """The OS's words for a failure, with the path it concerns when that is not the group itself."""
    text = error.strerror or str(error)
    return f"{text} ({error.filename})" if error.filename else text


def list_groups(folder: str) -> List[GroupInfo]:
    """Every complete group (readable manifest) under `<folder>/eval/`, oldest first."""
    eval_root = os.path.join(folder, EVAL_DIR)
    if not os.path.isdir(eval_root):
        return []
    groups = []
    for entry in sorted(os.listdir(eval_root)):
        path = os.path.join(eval_root, entry)
        if entry.startswith(".") or not os.path.isdir(path):
            continue
        manifest = read_manifest(path)
        if manifest is not None:
            groups.append(GroupInfo(path=path, manifest=manifest))
    return sorted(groups, key=lambda g: (g.manifest.get("written_unix", 0.0), g.path))


def latest_group(folder: str, **wanted: Any) -> GroupInfo:
    """The most recently written group whose manifest matches `wanted` (e.g. kind=, iteration=, dataset=)."""
    matching = [g for g in list_groups(folder)
                if all(g.manifest.get(key) == value for key, value in wanted.items())]
    if not matching:
        condition = ", ".join(f"{key} {value!r}" for key, value in wanted.items())
        raise FileNotFoundError(f"no evaluation group{' with ' + condition if condition else ''} in "
                                f"{os.path.join(folder, EVAL_DIR)}")
    return matching[-1]
