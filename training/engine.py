"""The training engine: one optimiser step on pair batches, and the loop over iterations.

Everything it runs on (model, optimiser, pair batches, run folder, evaluation data) is built by
`training/main.py`; what happens at period points besides the step and the log line - saving a
checkpoint generation, the periodic evaluation - comes in as `Hooks`.
"""
import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch
from torch.nn.parallel import DistributedDataParallel

from models.objective import l2_output, predict_different, relation_loss
from training.settings import Objective, Optimisation, RunSettings
from training.stopping import FiniteWatch, StopRequested, StopSignals
from utils.distributed import all_reduce_mean, get_world_size
from utils.logger import TensorBoardWriter
from utils.optim import set_lr
from utils.precision import autocast


class PeriodStats:
    """Sums over a logging period: loss, accuracy on same- and different-class pairs, output range."""

    def __init__(self, device: torch.device) -> None:
        # loss_sum, same_correct, same_total, diff_correct, diff_total (pairs = same_total + diff_total)
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)
        # On the device: reading them every micro-step would make each step wait for the GPU.
        self.out_min = torch.tensor(math.inf, device=device)
        self.out_max = torch.tensor(-math.inf, device=device)

    def update(self, loss: torch.Tensor, logits: torch.Tensor, relation: torch.Tensor, objective: Objective) -> None:
        """Add one micro-batch."""
        with torch.no_grad():
            different = predict_different(logits.float(), objective.loss_function, objective.sigmoid_compression,
                                          objective.sigmoid_expansion)
            is_diff = relation.bool()
            correct = different == is_diff
            n = float(relation.numel())
            self.sums += torch.stack([loss.detach().double() * n,
                                      (correct & ~is_diff).sum().double(), (~is_diff).sum().double(),
                                      (correct & is_diff).sum().double(), is_diff.sum().double()])
            if objective.loss_function == "L2":
                out = l2_output(logits.float(), objective.sigmoid_compression, objective.sigmoid_expansion)
                self.out_min = torch.minimum(self.out_min, out.min())
                self.out_max = torch.maximum(self.out_max, out.max())

    def summary(self) -> Dict[str, float]:
        """Averages over the period and over every process, and the number of pairs it trained on."""
        sums = all_reduce_mean(self.sums) * get_world_size()
        loss_sum, same_ok, same_n, diff_ok, diff_n = sums.tolist()
        n = same_n + diff_n
        acc_same = same_ok / max(same_n, 1.0)
        acc_diff = diff_ok / max(diff_n, 1.0)
        return {"loss": loss_sum / max(n, 1.0), "acc_same": acc_same, "acc_diff": acc_diff,
                "acc_mean": (acc_same + acc_diff) / 2, "pairs": n}


def collapse_warning(stats: PeriodStats, objective: Objective) -> Optional[str]:
    """A message when every L2 output sits at one saturated end (training cannot recover alone)."""
    out_min, out_max = float(stats.out_min), float(stats.out_max)
    if objective.loss_function != "L2" or out_min == math.inf:
        return None
    half = objective.sigmoid_expansion / 2
    spread = out_max - out_min
    if spread < 1e-3 * half and min(abs(out_min), abs(out_max)) > 0.99 * half:
        return (f"outputs collapsed: every pair scored {out_min:+.4f} (saturated at +/-{half}); "
                "the loss is stuck. Lower --learning_rate, use --clip_grad 1.0 or --head_init zero")
    return None


def backward_micro_batch(model: torch.nn.Module, images_a: torch.Tensor, images_b: torch.Tensor,
                         relation: torch.Tensor, objective: Objective, optimisation: Optimisation,
                         scaler: "torch.amp.GradScaler", device: torch.device, last: bool
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Add one micro-batch's gradient to `.grad`; returns its (unscaled loss, logits)."""
    # DDP all-reduces only on the last micro-step of an iteration; the others accumulate locally.
    ddp = isinstance(model, DistributedDataParallel)
    sync = model.no_sync() if (ddp and not last) else contextlib.nullcontext()
    with sync:
        with autocast(device, optimisation.amp):
            logits = model(images_a, images_b)
        loss = relation_loss(logits.float(), relation, objective.loss_function,
                             objective.sigmoid_compression, objective.sigmoid_expansion)
        # DDP averages over processes; dividing by accum_steps makes the sum over micro-steps the
        # mean over every pair of the iteration, i.e. the gradient of one batch of the effective size.
        scaler.scale(loss / optimisation.accum_steps).backward()
    return loss, logits


@dataclass
class Progress:
    """Where the loop is: the iteration (for the message of a run that ends early) and the micro-steps done."""

    iteration: int
    micro_step: int  # global micro-steps from the start of the pair stream: its position, for saving


@dataclass
class Hooks:
    """What the loop calls besides the step and the log line (built by training/main.py)."""

    save: Callable[[int], None]  # save a generation of this iteration, unless it is the last one saved
    evaluate: Callable[[int], None]  # the periodic evaluation (and the choice of the best generation)


@dataclass
class Engine:
    """A training run's moving parts; `train` is the loop, `step` one optimiser step."""

    model: torch.nn.Module  # wrapped in DistributedDataParallel when distributed
    optimizer: torch.optim.Optimizer
    scaler: "torch.amp.GradScaler"
    batches: Iterator[Tuple[int, tuple]]  # (pass index, pair batch) from training.pair_stream
    objective: Objective
    optimisation: Optimisation
    run: RunSettings
    device: torch.device
    progress: Progress
    hooks: Hooks
    stop: StopSignals
    watch: FiniteWatch
    log: logging.Logger
    tb_writer: TensorBoardWriter
    _period: Tuple[float, int] = field(default=(0.0, 0), init=False)  # (start time, first iteration) of the log period

    def step(self, iteration: int, stats: PeriodStats) -> float:
        """One optimiser step over `accum_steps` micro-batches; returns the learning rate it used."""
        lr = self.optimisation.schedule.lr(iteration)
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        for micro in range(self.optimisation.accum_steps):
            _, (images_a, images_b, _, relation) = next(self.batches)
            self.progress.micro_step += 1
            images_a = images_a.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            images_b = images_b.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            relation = relation.to(self.device, non_blocking=True).long()
            loss, logits = backward_micro_batch(self.model, images_a, images_b, relation, self.objective,
                                                self.optimisation, self.scaler, self.device,
                                                last=micro == self.optimisation.accum_steps - 1)
            stats.update(loss, logits, relation, self.objective)
            self.watch.record(loss, iteration)
        if self.optimisation.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.optimisation.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return lr

    def train(self) -> None:
        """Iterations after `progress.iteration` up to the last: step, log, save, evaluate, stop on a signal."""
        total, run = self.optimisation.schedule.iterations, self.run
        stats = PeriodStats(self.device)
        self._period = (time.perf_counter(), self.progress.iteration)
        self.model.train()
        for iteration in range(self.progress.iteration + 1, total + 1):
            self.progress.iteration = iteration
            lr = self.step(iteration, stats)
            final = iteration == total
            if iteration % run.log_period == 0 or final:
                self.log_period(iteration, lr, stats)
                stats = PeriodStats(self.device)
            if iteration % run.save_period == 0 or final:
                self.hooks.save(iteration)
            if iteration % run.eval_period == 0 or final:
                self.hooks.evaluate(iteration)
                self.model.train()
            check_point = iteration % run.log_period == 0 or iteration % run.save_period == 0
            signum = self.stop.agreed(check_point) if not final else 0
            if signum:
                if run.save_on_interrupt:
                    self.hooks.save(iteration)
                raise StopRequested(signum)

    def log_period(self, iteration: int, lr: float, stats: PeriodStats) -> None:
        """The log line and TensorBoard scalars of the period ending at `iteration` (checks for NaN first)."""
        total = self.optimisation.schedule.iterations
        summary = stats.summary()
        pairs = summary.pop("pairs")
        start, first_iteration = self._period
        elapsed = time.perf_counter() - start
        seconds = elapsed / max(1, iteration - first_iteration)
        eta = seconds * (total - iteration)
        # pairs/s counts every process's pairs: the throughput of the whole job.
        self.log.info("it %d/%d  loss %.4f  acc_same %.3f  acc_diff %.3f  acc %.3f  lr %.2e  %.3f s/it  "
                      "%.0f pairs/s  eta %s", iteration, total, summary["loss"], summary["acc_same"],
                      summary["acc_diff"], summary["acc_mean"], lr, seconds, pairs / max(elapsed, 1e-9),
                      time.strftime("%H:%M:%S", time.gmtime(eta)))
        # Before TensorBoard, which would only warn about a NaN and record it.
        self.watch.check(self.model, iteration)
        for name, value in summary.items():
            self.tb_writer.add_scalar(f"train/{name}", value, iteration)
        self.tb_writer.add_scalar("train/lr", lr, iteration)
        self.tb_writer.add_scalar("train/seconds_per_iteration", seconds, iteration)
        self.tb_writer.add_scalar("train/pairs_per_second", pairs / max(elapsed, 1e-9), iteration)
        warning = collapse_warning(stats, self.objective)
        if warning:
            self.log.warning(warning)
        self._period = (time.perf_counter(), iteration)
