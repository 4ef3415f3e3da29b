"""atomic_open: the old file survives a failure mid-write and no temporary file is left behind."""
import os

import pytest

from utils.atomic_files import atomic_open, atomic_write_text


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
