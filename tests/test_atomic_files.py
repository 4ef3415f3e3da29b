"""atomic_open and StagedFiles: old files survive a failure mid-write and no temporary file is left behind."""
import os

import pytest

from utils.atomic_files import StagedFiles, atomic_open, atomic_write_text


def test_failure_mid_write_keeps_previous_content(tmp_path):
    path = tmp_path / "sub" / "result.json"
    atomic_write_text(str(path), "old\n")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_open(str(path)) as out:
            out.write("half of the new")
            raise RuntimeError("killed")
    assert path.read_text() == "old\n"
    assert os.listdir(path.parent) == ["result.json"]
    atomic_write_text(str(path), "new\n")
    assert path.read_text() == "new\n" and oct(path.stat().st_mode & 0o777) == "0o644"


def test_mode_must_write_whole_files(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        with atomic_open(str(tmp_path / "x"), "a"):
            pass


def test_staged_files_replace_together_or_not_at_all(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.bin"
    atomic_write_text(str(a), "old a\n")
    with pytest.raises(RuntimeError, match="after the writes"):
        with StagedFiles() as files:
            with files.open(str(a)) as out:
                out.write("new a\n")
            with files.open(str(b), "wb") as out:
                out.write(b"new b")
            raise RuntimeError("after the writes, before the commit")
    assert a.read_text() == "old a\n" and not b.exists()
    assert sorted(os.listdir(tmp_path)) == ["a.txt"]
    with StagedFiles() as files:
        with files.open(str(a)) as out:
            out.write("new a\n")
        with files.open(str(b), "wb") as out:
            out.write(b"new b")
        assert a.read_text() == "old a\n"  # nothing is replaced before the block ends
    assert a.read_text() == "new a\n" and b.read_bytes() == b"new b"
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.bin"]
