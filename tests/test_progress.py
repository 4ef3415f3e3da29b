"""Progress reporting: plain periodic lines off a terminal, silence when quiet, only on the main process."""
import pytest

import utils.progress as progress_module
from utils.progress import note, progress, set_quiet


@pytest.fixture(autouse=True)
def _not_quiet():
    set_quiet(False)
    yield
    set_quiet(False)


def test_plain_lines_off_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(progress_module, "PLAIN_EVERY_SECONDS", 0.0)  # a line after every item
    ticks = iter(range(100))
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: float(next(ticks)))
    assert list(progress(range(3), total=3, desc="features", unit="batch")) == [0, 1, 2]
    lines = capsys.readouterr().out.splitlines()
    # Items at t = 1, 2, 3 after a start at t = 0: one item per second, the rest left in the ETA.
    assert lines == ["features: 1/3 batch (1.0 batch/s, eta 00:00:02)",
                     "features: 2/3 batch (1.0 batch/s, eta 00:00:01)",
                     "features: 3/3 batch (1.0 batch/s, eta 00:00:00)"]


def test_quiet_silences_progress_and_notes(monkeypatch, capsys):
    monkeypatch.setattr(progress_module, "PLAIN_EVERY_SECONDS", 0.0)
    set_quiet(True)
    assert list(progress(range(3), total=3, desc="x")) == [0, 1, 2]
    note("a phase took 1 s")
    assert capsys.readouterr().out == ""
    set_quiet(False)
    note("a phase took 1 s")
    assert capsys.readouterr().out == "a phase took 1 s\n"


def test_only_the_main_process_reports(monkeypatch, capsys):
    monkeypatch.setattr(progress_module, "PLAIN_EVERY_SECONDS", 0.0)
    monkeypatch.setattr(progress_module, "is_main_process", lambda: False)
    assert list(progress(range(2), total=2, desc="x")) == [0, 1]
    note("hidden")
    assert capsys.readouterr().out == ""
