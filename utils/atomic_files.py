"""Files written under a temporary name and renamed into place: readers never see half a file."""
import contextlib
import os
import tempfile
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w") -> Iterator[IO]:
    """Open a temp file next to `path` (same filesystem); on success it replaces `path`, else vanishes."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', got {mode!r}")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    handle, temp_path = tempfile.mkstemp(dir=parent, prefix=".tmp_", suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(handle, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        # mkstemp makes owner-only files; outputs are as readable as any other file.
        os.chmod(temp_path, 0o644)
        os.replace(temp_path, path)
    except BaseException:
        if os.path.exists(temp_path):
            os.remove(temp_path)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write a whole text file atomically."""
    with atomic_open(path, "w") as out:
        out.write(text)
