"""atomic_open and StagedFiles: old files survive a failure mid-write and no temporary file is left behind;
temp files name their writer, and only a dead writer's are swept."""
import os
import subprocess
import sys

import pytest

from utils.atomic_files import (
    StagedFiles, atomic_open, atomic_write_text, host_name, remove_stale_temps, temp_name, temp_writer,
)


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


def test_temp_names_carry_host_and_pid(tmp_path):
    with atomic_open(str(tmp_path / "result.json")) as out:
        out.write("x")
        (name,) = os.listdir(tmp_path)
        assert name.startswith(".tmp_") and name.endswith(".json")
        assert temp_writer(name) == (host_name(), os.getpid())
    assert temp_writer(temp_name()) == (host_name(), os.getpid())
    # Host names may hold dashes and digits; the pid is the last number between dashes.
    assert temp_writer(".tmp_node-12-a-345-abc_1234.pkl") == ("node-12-a", 345)
    assert temp_writer(".tmp-gpu-7-99-0a1b2c3d") == ("gpu-7", 99)
    assert temp_writer(".tmp_k3j4h5g6.pkl") is None  # older versions named no writer
    assert temp_writer("out.txt") is None


def _dead_pid():
    """The id of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_only_temps_of_dead_writers_on_this_host_are_removed(tmp_path):
    host, dead, alive = host_name(), _dead_pid(), os.getpid()
    (tmp_path / "eval").mkdir()
    (tmp_path / "checkpoints").mkdir()
    dead_file = tmp_path / "eval" / f".tmp_{host}-{dead}-abc12345.json"
    dead_file.write_text("half")
    dead_generation = tmp_path / "checkpoints" / f".tmp-{host}-{dead}-0a1b2c3d"
    dead_generation.mkdir()
    (dead_generation / "cls_rel.pkl").write_bytes(b"staged")
    (dead_generation / f".tmp_{host}-{dead}-inner123.pkl").write_bytes(b"inside")
    dead_link = tmp_path / "checkpoints" / f".tmp-{host}-{dead}-ffffeeee"
    dead_link.symlink_to("it000001")
    live = tmp_path / f".tmp_{host}-{alive}-live0001.pkl"
    live.write_bytes(b"being written")
    foreign = tmp_path / f".tmp_elsewhere-{dead}-abcdefgh.pkl"
    foreign.write_bytes(b"other machine")
    unknown = tmp_path / ".tmp_k3j4h5g6.pkl"
    unknown.write_bytes(b"old version")
    (tmp_path / "args.json").write_text("{}")

    sweep = remove_stale_temps(str(tmp_path))

    assert sorted(sweep.removed) == sorted(str(p) for p in (dead_file, dead_generation, dead_link))
    assert not dead_file.exists() and not dead_generation.exists() and not os.path.lexists(dead_link)
    left = dict(sweep.left)
    assert left == {str(live): f"process {alive} is alive", str(foreign): "written on host elsewhere",
                    str(unknown): "no writer in its name"}
    assert live.read_bytes() == b"being written" and foreign.exists() and unknown.exists()
    assert (tmp_path / "args.json").read_text() == "{}"
    assert remove_stale_temps(str(tmp_path / "missing")).removed == []
