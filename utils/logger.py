"""Training-progress logging: TensorBoard (rank 0) and the text log (`out.txt`)."""
import logging
import numbers
import os
import sys
from typing import Any, Optional

import torch

TEXT_LOGGER_NAME = "resend"
_LOG_FORMAT = "[%(asctime)s] %(message)s"


def _to_float(name: str, value: Any) -> float:
    """A loggable number from a Python number or a one-element tensor."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {name!r} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return float(value.item())
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"metric {name!r} must be a number or a one-element tensor, got {type(value).__name__}")


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

    def add_histogram(self, tag: str, values: Any, step: int) -> None:
        """Log a histogram of `values` (tensor or array)."""
        if self._writer is not None:
            if isinstance(values, torch.Tensor):
                values = values.detach().float().cpu().numpy()
            self._writer.add_histogram(tag, values, step)

    def add_pr_curve(self, tag: str, labels: Any, predictions: Any, step: int) -> None:
        """Log a precision-recall curve (labels in {0, 1}, predictions in [0, 1])."""
        if self._writer is not None:
            if isinstance(labels, torch.Tensor):
                labels = labels.detach().cpu().numpy()
            if isinstance(predictions, torch.Tensor):
                predictions = predictions.detach().float().cpu().numpy()
            self._writer.add_pr_curve(tag, labels, predictions, step)

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


def setup_text_log(path: Optional[str], enabled: bool) -> logging.Logger:
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
    console.setLevel(logging.INFO if enabled else logging.WARNING)
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
