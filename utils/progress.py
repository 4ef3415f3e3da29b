"""Progress of long loops: a tqdm bar on a terminal, a plain line every few seconds otherwise, nothing when quiet.

Only the main process reports. `set_quiet(True)` (train.py's `--quiet`) silences bars, plain
progress lines and `note` lines; results and errors are printed regardless.
"""
import sys
import time
from typing import Iterable, Iterator, Optional, TypeVar

from tqdm import tqdm

from utils.distributed import is_main_process

T = TypeVar("T")

# A log file or CI console gets one line per this many seconds instead of a redrawn bar.
PLAIN_EVERY_SECONDS = 10.0
_settings = {"quiet": False}


def set_quiet(quiet: bool) -> None:
    """Silence (or restore) progress bars, progress lines and notes."""
    _settings["quiet"] = bool(quiet)


def reporting() -> bool:
    """Whether this process reports progress (the main process, not quiet)."""
    return is_main_process() and not _settings["quiet"]


def note(line: str) -> None:
    """A line of progress information (e.g. a phase and its seconds), unless quiet."""
    if reporting():
        print(line, flush=True)


def progress(iterable: Iterable[T], total: Optional[int], desc: str, unit: str = "it") -> Iterator[T]:
    """Yield from `iterable`, showing a bar on a terminal or a plain line every PLAIN_EVERY_SECONDS."""
    if not reporting():
        yield from iterable
        return
    if sys.stderr.isatty():
        yield from tqdm(iterable, total=total, desc=desc, unit=unit, leave=False)
        return
    start = last = time.perf_counter()
    for done, item in enumerate(iterable, start=1):
        yield item
        now = time.perf_counter()
        if now - last >= PLAIN_EVERY_SECONDS:
            rate = done / (now - start)
            left = f", eta {time.strftime('%H:%M:%S', time.gmtime((total - done) / rate))}" if total else ""
            print(f"{desc}: {done}/{total or '?'} {unit} ({rate:.1f} {unit}/s{left})", flush=True)
            last = now
