"""Training-progress logging: smoothed meters, progress lines, TensorBoard (rank 0) and the text log."""
import datetime
import logging
import math
import numbers
import os
import statistics
import sys
import time
from collections import defaultdict, deque
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.distributed as dist

from utils.distributed import communication_device, is_dist_avail_and_initialized

TEXT_LOGGER_NAME = "resend"
_LOG_FORMAT = "[%(asctime)s] %(message)s"


class SmoothedValue:
    """A metric with a sliding window (median, avg, max, value) and a running global average."""

    def __init__(self, window_size: int = 20, fmt: Optional[str] = None) -> None:
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        self.window: deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt or "{median:.4f} ({global_avg:.4f})"

    def update(self, value: float, n: int = 1) -> None:
        """Record `value` (weighted by `n` in the global average)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        value = float(value)
        self.window.append(value)
        self.total += value * n
        self.count += n

    def synchronize_between_processes(self) -> None:
        """Sum count and total over processes so global_avg covers all ranks (the window stays local)."""
        if not is_dist_avail_and_initialized():
            return
        stats = torch.tensor([self.count, self.total], dtype=torch.float64, device=communication_device())
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        count, total = stats.tolist()
        self.count, self.total = int(round(count)), total

    # Empty meters report nan: the mean of nothing, visible in a log line instead of a crash mid-run.
    @property
    def median(self) -> float:
        """Median of the window."""
        return statistics.median(self.window) if self.window else math.nan

    @property
    def avg(self) -> float:
        """Mean of the window."""
        return sum(self.window) / len(self.window) if self.window else math.nan

    @property
    def global_avg(self) -> float:
        """Weighted mean of every update."""
        return self.total / self.count if self.count else math.nan

    @property
    def max(self) -> float:
        """Largest value in the window."""
        return max(self.window) if self.window else math.nan

    @property
    def value(self) -> float:
        """Most recent value."""
        return self.window[-1] if self.window else math.nan

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg,
                               max=self.max, value=self.value)


def _to_float(name: str, value: Any) -> float:
    """A loggable number from a Python number or a one-element tensor."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {name!r} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return float(value.item())
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"metric {name!r} must be a number or a one-element tensor, got {type(value).__name__}")


def _format_seconds(seconds: float) -> str:
    """H:MM:SS."""
    return str(datetime.timedelta(seconds=int(seconds)))


class MetricLogger:
    """Named SmoothedValues plus progress lines with ETA, for epoch (`log_every`) and iteration (`log_line`) loops."""

    def __init__(self, delimiter: str = "  ", window_size: int = 20,
                 log_fn: Optional[Callable[[str], None]] = None) -> None:
        self.meters: dict[str, SmoothedValue] = defaultdict(lambda: SmoothedValue(window_size))
        self.delimiter = delimiter
        # None means the builtin print looked up at call time, so the rank-aware print of
        # utils.distributed.setup_for_distributed applies.
        self.log_fn = log_fn
        self._timer_start: Optional[tuple[float, int]] = None

    def _emit(self, line: str) -> None:
        if self.log_fn is None:
            print(line, flush=True)
        else:
            self.log_fn(line)

    def update(self, **kwargs: Any) -> None:
        """Record one value per named metric (numbers or one-element tensors)."""
        for name, value in kwargs.items():
            self.meters[name].update(_to_float(name, value))

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        """Use a custom SmoothedValue (e.g. another window or format) for `name`."""
        self.meters[name] = meter

    def __getattr__(self, name: str) -> SmoothedValue:
        meters = self.__dict__.get("meters", {})
        if name in meters:
            return meters[name]
        raise AttributeError(f"{type(self).__name__} has no attribute or meter {name!r}")

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self) -> None:
        """Synchronize every meter's global average over processes."""
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def _progress_line(self, header: str, step: int, total: int, eta_seconds: Optional[float],
                       extra: list[str]) -> str:
        width = len(str(total))
        parts = [f"{header} [{step:>{width}}/{total}]".strip()]
        parts.append("eta: " + ("-" if eta_seconds is None else _format_seconds(eta_seconds)))
        if self.meters:
            parts.append(str(self))
        parts.extend(extra)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2 ** 20:.0f} MB")
        return self.delimiter.join(parts)

    def start_timer(self, iteration: int = 0) -> None:
        """Mark `iteration` (e.g. the resume point) as now; the next log_line times iterations from here."""
        self._timer_start = (time.time(), iteration)

    def log_line(self, iteration: int, total: int, header: str = "") -> str:
        """Progress line for an iteration loop; time/it and ETA come from the previous log_line or start_timer."""
        if total < 1:
            raise ValueError(f"total must be >= 1, got {total}")
        now = time.time()
        eta, extra = None, ["time: - s/it"]
        if self._timer_start is not None:
            start_time, start_iteration = self._timer_start
            done = iteration - start_iteration
            if done > 0:
                per_iteration = (now - start_time) / done
                eta = per_iteration * max(total - iteration, 0)
                extra = [f"time: {per_iteration:.4f} s/it"]
        self._timer_start = (now, iteration)
        return self._progress_line(header, iteration, total, eta, extra)

    def log_every(self, iterable: Iterable, print_freq: int, header: str = "") -> Iterator:
        """Yield from `iterable`, emitting a progress line every `print_freq` items and at the end."""
        if print_freq < 1:
            raise ValueError(f"print_freq must be >= 1, got {print_freq}")
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError("log_every needs an iterable with len() (e.g. a DataLoader) to compute the ETA") from None
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        data_time = SmoothedValue(fmt="{avg:.4f}")
        start = end = time.time()
        for i, obj in enumerate(iterable):
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                eta = iter_time.global_avg * (total - 1 - i)
                self._emit(self._progress_line(header, i, total, eta,
                                               [f"time: {iter_time} s/it", f"data: {data_time} s"]))
            end = time.time()
        elapsed = time.time() - start
        self._emit(f"{header} total time: {_format_seconds(elapsed)} "
                   f"({elapsed / max(total, 1):.4f} s / it)".strip())


class TensorBoardWriter:
    """tensorboardX SummaryWriter on the enabled process (rank 0); every method is a no-op elsewhere."""

    def __init__(self, log_dir: Optional[str], enabled: bool) -> None:
        self.enabled = bool(enabled)
        self._writer = None
        if self.enabled:
            if not log_dir:
                raise ValueError("TensorBoardWriter: log_dir is required when enabled")
            # Imported here so processes that never write do not pay for tensorboardX/protobuf.
            from tensorboardX import SummaryWriter
            self._writer = SummaryWriter(logdir=str(log_dir))

    @property
    def log_dir(self) -> Optional[str]:
        """Directory of the events files (None when disabled)."""
        return None if self._writer is None else self._writer.logdir

    def add_scalar(self, tag: str, value: Any, step: int) -> None:
        """Log one scalar."""
        if self._writer is not None:
            self._writer.add_scalar(tag, _to_float(tag, value), step)

    def add_scalars(self, main_tag: str, values: dict[str, Any], step: int) -> None:
        """Log several scalars on one chart."""
        if self._writer is not None:
            self._writer.add_scalars(main_tag, {k: _to_float(k, v) for k, v in values.items()}, step)

    def add_histogram(self, tag: str, values: Any, step: int, bins: str = "tensorflow") -> None:
        """Log a histogram of `values` (tensor or array)."""
        if self._writer is not None:
            if isinstance(values, torch.Tensor):
                values = values.detach().float().cpu().numpy()
            self._writer.add_histogram(tag, values, step, bins=bins)

    def add_pr_curve(self, tag: str, labels: Any, predictions: Any, step: int, num_thresholds: int = 127) -> None:
        """Log a precision-recall curve (labels in {0, 1}, predictions in [0, 1])."""
        if self._writer is not None:
            if isinstance(labels, torch.Tensor):
                labels = labels.detach().cpu().numpy()
            if isinstance(predictions, torch.Tensor):
                predictions = predictions.detach().float().cpu().numpy()
            self._writer.add_pr_curve(tag, labels, predictions, step, num_thresholds=num_thresholds)

    def add_text(self, tag: str, text: str, step: int) -> None:
        """Log a text (markdown) entry."""
        if self._writer is not None:
            self._writer.add_text(tag, text, step)

    def flush(self) -> None:
        """Write pending events to disk."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the events files."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "TensorBoardWriter":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def setup_text_log(path: Optional[str], enabled: bool = True, console_level: Optional[int] = None) -> logging.Logger:
    """The "resend" logger: console always, plus the text file `path` (out.txt) when enabled; idempotent."""
    logger = logging.getLogger(TEXT_LOGGER_NAME)
    logger.setLevel(logging.INFO)
    # Our own handlers only: propagating to the root logger would print every line twice.
    logger.propagate = False
    for handler in [h for h in logger.handlers if getattr(h, "_resend_handler", False)]:
        logger.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter(_LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S")

    console = logging.StreamHandler(sys.stdout)
    # Non-main ranks (enabled=False) only surface warnings, so N processes do not repeat every line.
    console.setLevel(console_level if console_level is not None else
                     (logging.INFO if enabled else logging.WARNING))
    console.setFormatter(formatter)
    console._resend_handler = True  # type: ignore[attr-defined]
    logger.addHandler(console)

    if enabled:
        if not path:
            raise ValueError("setup_text_log: a file path is required when enabled")
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        # Append: a resumed run continues the same out.txt.
        file_handler = logging.FileHandler(path, mode="a", encoding="utf-8")
        file_handler.setLevel(logging.INFO)
        file_handler.setFormatter(formatter)
        file_handler._resend_handler = True  # type: ignore[attr-defined]
        logger.addHandler(file_handler)
    return logger
