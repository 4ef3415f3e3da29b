"""Files written under a temporary name and renamed into place: readers never see half a file.

Every temporary name carries its writer's host and process id (`.tmp_<host>-<pid>-<random>` for
files, `.tmp-<host>-<pid>-<random>` for folders and links), so that the leftovers of a killed
writer can be told from the work in progress of a live one (`remove_stale_temps`).
"""
import contextlib
import os
import re
import secrets
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from types import TracebackType
from typing import IO, Iterator, List, Optional, Tuple, Type

TEMP_FILE_PREFIX = ".tmp_"
TEMP_DIR_PREFIX = ".tmp-"
# <prefix><host>-<pid>-<random>[.<ext>]; the host may itself contain '-', the random part cannot.
_TEMP_NAME = re.compile(r"^\.tmp[_-](?P<host>[A-Za-z0-9.-]+)-(?P<pid>\d+)-(?P<random>[A-Za-z0-9_]+)(\.[^-]*)?$")


def host_name() -> str:
    """This machine's name, reduced to the characters a temp name may hold."""
    return re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname()) or "host"


def writer_tag() -> str:
    """`<host>-<pid>-`: the part of a temp name that identifies its writer."""
    return f"{host_name()}-{os.getpid()}-"


def temp_name(prefix: str = TEMP_DIR_PREFIX) -> str:
    """A fresh temp name for a folder or link (files get theirs from mkstemp)."""
    return f"{prefix}{writer_tag()}{secrets.token_hex(4)}"


def temp_writer(name: str) -> Optional[Tuple[str, int]]:
    """(host, pid) of the process that wrote temp entry `name`; None if it is not a temp name of ours."""
    match = _TEMP_NAME.match(name)
    if match is None:
        return None
    return match.group("host"), int(match.group("pid"))


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host (a reused id counts as alive: never delete then)."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def fsync_dir(path: str) -> None:
    """Flush a folder's entries (renames, new links) to disk, so that they survive a power cut."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


@dataclass
class TempSweep:
    """What remove_stale_temps did: temp entries removed, and those left with the reason."""

    removed: List[str] = field(default_factory=list)
    left: List[Tuple[str, str]] = field(default_factory=list)


def remove_stale_temps(folder: str) -> TempSweep:
    """Delete the temp files, folders and links under `folder` whose writer, on this host, is dead.

    Temps of a live process or of another host are left alone (their writer may still rename
    them into place); so are `.tmp*` names without a writer (older versions of this project).
    Symbolic links to folders are not followed.
    """
    sweep = TempSweep()
    if not os.path.isdir(folder):
        return sweep
    host = host_name()
    for parent, dirnames, filenames in os.walk(folder):
        for name in sorted(dirnames + filenames):
            if not name.startswith(".tmp"):
                continue
            path = os.path.join(parent, name)
            writer = temp_writer(name)
            if writer is None:
                sweep.left.append((path, "no writer in its name"))
            elif writer[0] != host:
                sweep.left.append((path, f"written on host {writer[0]}"))
            elif pid_alive(writer[1]):
                sweep.left.append((path, f"process {writer[1]} is alive"))
            else:
                _remove_entry(path)
                sweep.removed.append(path)
        # Never descend into temp folders (removed or left whole) or through links.
        dirnames[:] = [d for d in dirnames if not d.startswith(".tmp")]
    return sweep


def _remove_entry(path: str) -> None:
    """Remove a file, link or folder tree; it may already be gone."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)  # errors are raised: a sweep never reports a folder it could not remove
    else:
        _remove_if_present(path)


class StagedFiles:
    """A group of files that replace their targets together, and only once every one is written.

        with StagedFiles() as files:
            with files.open("a.pkl", "wb") as out:
                torch.save(obj, out)
            with files.open("b.txt") as out:
                out.write("5\\n")

    An error anywhere in the block (or in a write) replaces nothing and leaves no temp file behind.
    """

    def __init__(self) -> None:
        self._staged: List[Tuple[str, str]] = []

    @contextlib.contextmanager
    def open(self, path: str, mode: str = "w") -> Iterator[IO]:
        """A temp file next to `path` (same filesystem, so the final rename is atomic), flushed to disk."""
        if mode not in ("w", "wb"):
            raise ValueError(f"staged files are written whole: mode 'w' or 'wb', got {mode!r}")
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        handle, temp_path = tempfile.mkstemp(dir=parent, prefix=TEMP_FILE_PREFIX + writer_tag(),
                                             suffix=os.path.splitext(path)[1])
        try:
            with os.fdopen(handle, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as out:
                yield out
                out.flush()
                os.fsync(out.fileno())
            # mkstemp makes owner-only files; outputs are as readable as any other file.
            os.chmod(temp_path, 0o644)
        except BaseException:
            _remove_if_present(temp_path)
            raise
        self._staged.append((temp_path, path))

    def __enter__(self) -> "StagedFiles":
        return self

    def __exit__(self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException],
                 traceback: Optional[TracebackType]) -> None:
        staged, self._staged = self._staged, []
        moved = 0
        try:
            if exc_type is None:
                for temp_path, path in staged:
                    os.replace(temp_path, path)
                    moved += 1
        finally:
            for temp_path, _ in staged[moved:]:
                _remove_if_present(temp_path)


def _remove_if_present(path: str) -> None:
    """Delete a leftover temp file; it may already be gone."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w") -> Iterator[IO]:
    """Open a temp file next to `path`; on success it replaces `path`, else vanishes."""
    with StagedFiles() as files, files.open(path, mode) as out:
        yield out


def atomic_write_text(path: str, text: str) -> None:
    """Write a whole text file atomically."""
    with atomic_open(path) as out:
        out.write(text)
