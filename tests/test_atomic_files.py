"""atomic_open and StagedFiles: old files survive a failure mid-write and no temporary file is left behind;
temp files name their writer, and only a dead writer's are swept."""
import os
import re
import socket
import subprocess
import sys

import pytest

from utils import atomic_files
from utils.atomic_files import (
    StagedFiles,
    atomic_open,
    atomic_write_text,
    fsync_dir,
    host_name,
    pid_alive,
    remove_stale_temps,
    temp_name,
    temp_writer,
)


def test_failure_mid_write_keeps_previous_content(tmp_path):
    path = tmp_path / "sub" / "result.json"
    atomic_write_text(str(path), "old\n")
    with pytest.raises(RuntimeError, match="^killed$"), atomic_open(str(path)) as out:
        out.write("half of the new")
        raise RuntimeError("killed")
    assert path.read_text() == "old\n"
    assert os.listdir(path.parent) == ["result.json"]
    atomic_write_text(str(path), "new\n")
    assert path.read_text() == "new\n" and oct(path.stat().st_mode & 0o777) == "0o644"


def test_mode_must_write_whole_files(tmp_path):
    with pytest.raises(ValueError, match=r"^staged files are written whole: mode 'w' or 'wb', got 'a'$"), \
            atomic_open(str(tmp_path / "x"), "a"):
        pass


def test_staged_files_replace_together_or_not_at_all(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.bin"
    atomic_write_text(str(a), "old a\n")
    with pytest.raises(RuntimeError, match="^after the writes, before the commit$"), StagedFiles() as files:
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


def test_pid_alive_for_a_live_child_leaves_it_running():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert pid_alive(child.pid)
        with pytest.raises(subprocess.TimeoutExpired):  # probing sends no signal that ends the process
            child.wait(timeout=0.2)
    finally:
        child.kill()
        child.wait()
    assert not pid_alive(child.pid)


def test_pid_alive_never_says_dead_when_unsure(monkeypatch):
    # 0 and negative ids name process groups, not a writer: treated as alive (never delete).
    assert pid_alive(0) and pid_alive(-12345)

    def not_permitted(pid, signal):
        raise PermissionError(f"[Errno 1] Operation not permitted: {pid}")

    monkeypatch.setattr(os, "kill", not_permitted)
    assert pid_alive(_dead_pid()) is True  # another user's process


def test_host_name_reduced_to_temp_name_characters(monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "Node_7.Lab-x y")
    assert host_name() == "Node-7.Lab-x-y"
    monkeypatch.setattr(socket, "gethostname", lambda: "")
    assert host_name() == "host"


def test_temp_name_format():
    name = temp_name()
    assert re.fullmatch(rf"\.tmp-{re.escape(host_name())}-{os.getpid()}-[0-9a-f]{{8}}", name), name
    assert re.fullmatch(r"\.tmp_.*-[0-9a-f]{8}", temp_name(".tmp_"))


def test_fsync_dir_flushes_and_closes(tmp_path):
    open_before = len(os.listdir("/proc/self/fd"))
    fsync_dir(str(tmp_path))
    assert len(os.listdir("/proc/self/fd")) == open_before
    with pytest.raises(FileNotFoundError, match="missing"):
        fsync_dir(str(tmp_path / "missing"))


def test_failed_replace_midway_leaves_no_temp_file(tmp_path, monkeypatch):
    paths = [tmp_path / name for name in ("a.txt", "b.txt", "c.txt")]
    for path in paths:
        atomic_write_text(str(path), f"old {path.name}\n")
    real_replace = os.replace

    def replace_failing_on_b(src, dst):
        if str(dst).endswith("b.txt"):
            raise OSError(f"disk gone while replacing {dst}")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_failing_on_b)
    with pytest.raises(OSError, match=r"^disk gone while replacing .*b\.txt$"), StagedFiles() as files:
        for path in paths:
            with files.open(str(path)) as out:
                out.write(f"new {path.name}\n")
    # a.txt was replaced before the failure; b.txt and c.txt keep their content; no temp file is left.
    assert [p.read_text() for p in paths] == ["new a.txt\n", "old b.txt\n", "old c.txt\n"]
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.txt", "c.txt"]


def test_remove_entry_tolerates_a_vanished_path(tmp_path):
    atomic_files._remove_entry(str(tmp_path / "gone.tmp"))
    atomic_files._remove_if_present(str(tmp_path / "gone.tmp"))
    assert os.listdir(tmp_path) == []


def test_sweep_raises_when_a_stale_folder_cannot_be_removed(tmp_path, monkeypatch):
    stale = tmp_path / f".tmp-{host_name()}-{_dead_pid()}-0a1b2c3d"
    stale.mkdir()
    (stale / "cls_rel.pkl").write_bytes(b"staged")

    def refusing_rmdir(path, *args, **kwargs):
        raise PermissionError(f"[Errno 13] Permission denied: {path!r}")

    monkeypatch.setattr(os, "rmdir", refusing_rmdir)
    with pytest.raises(PermissionError, match="Permission denied"):
        remove_stale_temps(str(tmp_path))
    monkeypatch.undo()
    assert stale.is_dir()


def test_only_temps_of_dead_writers_on_this_host_are_removed(tmp_path):
    # The live writer is a child process: probing it must leave it running.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _sweep_with_live_writer(tmp_path, child.pid)
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(timeout=0.2)
    finally:
        child.kill()
        child.wait()


def _sweep_with_live_writer(tmp_path, alive):
    host, dead = host_name(), _dead_pid()
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
    (tmp_path / "eval" / ".keep").write_text("")  # sorts before the temp names of its folder
    # A live writer's folder is left whole, even a dead writer's temp inside it.
    live_folder = tmp_path / f".tmp-{host}-{alive}-aaaa0000"
    live_folder.mkdir()
    inner = live_folder / f".tmp_{host}-{dead}-inner999.pkl"
    inner.write_bytes(b"inside a live folder")

    sweep = remove_stale_temps(str(tmp_path))

    assert sorted(sweep.removed) == sorted(str(p) for p in (dead_file, dead_generation, dead_link))
    assert not dead_file.exists() and not dead_generation.exists() and not os.path.lexists(dead_link)
    left = dict(sweep.left)
    assert left == {str(live): f"process {alive} is alive", str(foreign): "written on host elsewhere",
                    str(unknown): "no writer in its name", str(live_folder): f"process {alive} is alive"}
    assert inner.read_bytes() == b"inside a live folder"
    assert live.read_bytes() == b"being written" and foreign.exists() and unknown.exists()
    assert (tmp_path / "args.json").read_text() == "{}"
    assert remove_stale_temps(str(tmp_path / "missing")).removed == []


def test_staged_file_is_flushed_to_disk_before_it_replaces_the_target(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def logging_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def logging_replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", logging_fsync)
    monkeypatch.setattr(os, "replace", logging_replace)
    target = tmp_path / "result.json"
    atomic_write_text(str(target), "{}\n")
    (fsync, replace) = events
    assert fsync == ("fsync", replace[1]) and replace[2] == str(target)
    assert os.path.basename(replace[1]).startswith(".tmp_" + host_name())


def test_text_is_written_as_utf8_under_any_locale(tmp_path):
    path = tmp_path / "out.txt"
    code = ("import sys, locale; from utils.atomic_files import atomic_write_text; "
            "assert locale.getpreferredencoding(False) != 'UTF-8', locale.getpreferredencoding(False); "
            "atomic_write_text(sys.argv[1], 'caf\\u00e9 \\u2713\\n')")
    env = dict(os.environ, LC_ALL="C", LANG="C", PYTHONCOERCECLOCALE="0", PYTHONUTF8="0",
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert path.read_bytes() == "café ✓\n".encode()
