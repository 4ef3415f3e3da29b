"""How a training run stops early: SIGINT/SIGTERM agreed by every process, and NaN or inf losses and weights."""
import signal
import threading
import time
from types import FrameType
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist

from utils.distributed import communication_device, get_world_size, is_dist_avail_and_initialized


class NonFiniteError(ValueError):
    """A NaN or inf loss or weight: training stopped, and nothing from that point on was saved."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM ended training; the message says at which iteration and what is saved."""

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # 128 + the signal's number, as a shell reports a killed command


class StopRequested(Exception):
    """Raised inside the loop when every process has agreed to stop after a signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _all_reduce(values: torch.Tensor, op: "dist.ReduceOp") -> torch.Tensor:
    """`values` reduced with `op` over every process (itself in a single process)."""
    if not is_dist_avail_and_initialized():
        return values
    wire = values.to(communication_device())
    dist.all_reduce(wire, op=op)
    return wire.to(values.device)


class StopSignals:
    """While active, SIGINT/SIGTERM ask the loop to stop after the current iteration; a second one interrupts.

    The save in progress therefore finishes; a second signal (over REPEAT_AFTER_S later) raises
    KeyboardInterrupt wherever the process is, and an interrupted save leaves the previous
    generation (saves are staged).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    # Ctrl-C under torchrun reaches each worker twice within milliseconds (from the terminal, and
    # forwarded by the launcher): a repeat that close is the same request, not an insistence.
    REPEAT_AFTER_S = 2.0

    def __init__(self) -> None:
        self.signum = 0
        self._first_at = 0.0
        self._previous: Dict[int, object] = {}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if not self.signum:
            self.signum, self._first_at = signum, time.monotonic()
        elif time.monotonic() - self._first_at > self.REPEAT_AFTER_S:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")

    def __enter__(self) -> "StopSignals":
        # Python delivers signals to the main thread only; elsewhere the default handling stays.
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def agreed(self, check_point: bool) -> int:
        """The signal every process stops for (0: go on); several processes agree at check points only."""
        if get_world_size() == 1:
            return self.signum
        if not check_point:
            return 0
        flag = torch.tensor([self.signum], dtype=torch.int64)
        return int(_all_reduce(flag, dist.ReduceOp.MAX).item())


_NEVER = torch.iinfo(torch.int64).max


class FiniteWatch:
    """The first iteration with a NaN or inf loss, kept on the device: read at check points, not every step."""

    def __init__(self, device: torch.device, describe_last: Callable[[], str]) -> None:
        self.device = device
        self.describe_last = describe_last  # says which checkpoint is kept, for the error message
        self.first_bad = torch.full((), _NEVER, dtype=torch.int64, device=device)

    def record(self, loss: torch.Tensor, iteration: int) -> None:
        """Note a micro-step's loss (no host-device sync)."""
        self.first_bad.masked_fill_(~torch.isfinite(loss.detach()) & (self.first_bad == _NEVER), iteration)

    def check(self, model: torch.nn.Module, iteration: int) -> None:
        """Raise NonFiniteError when any process saw a non-finite loss, or holds a non-finite weight."""
        with torch.no_grad():
            tensors = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
            finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all()
            weights_bad = torch.where(finite, torch.tensor(_NEVER, device=self.device),
                                      torch.tensor(iteration, device=self.device))
        first_loss, first_weights = _all_reduce(torch.stack([self.first_bad, weights_bad]),
                                                dist.ReduceOp.MIN).tolist()
        if first_loss == _NEVER and first_weights == _NEVER:
            return
        what = (f"non-finite loss (NaN or inf) at iteration {first_loss}" if first_loss != _NEVER
                else f"non-finite weights at iteration {first_weights}")
        raise NonFiniteError(f"{what}: training stopped at iteration {iteration} without saving it; "
                             f"{self.describe_last()}; lower --learning_rate or set --clip_grad")
