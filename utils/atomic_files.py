"""Files written under a temporary name and renamed into place: readers never see half a file."""
import contextlib
import os
import tempfile
from types import TracebackType
from typing import IO, Iterator, List, Optional, Tuple, Type


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
        handle, temp_path = tempfile.mkstemp(dir=parent, prefix=".tmp_", suffix=os.path.splitext(path)[1])
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
    with atomic_open(path, "w") as out:
        out.write(text)
