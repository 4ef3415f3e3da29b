"""The iteration-based training loop (one code path for 1 and N processes)."""
import argparse
import contextlib
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from types import FrameType
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from datasets.benchmarks import EvalSplit
from datasets.image_lists import DataError
from datasets.train_lists import DEFAULT_EVAL_DATASET, train_samples
from datasets.transforms import train_transform
from evaluation.evaluate import EvalResult, evaluate_splits, load_splits
from evaluation.report import write_results
from evaluation.settings import eval_settings, settings_record
from models.backbone import ResNetBackbone
from models.checkpoint import load_model_folder
from models.objective import l2_output, predict_different, relation_loss
from models.relational import RelationalTransformer
from models.resend import ReSeND
from training.pair_stream import PairStream
from training.run_folder import (
    RunFolder, describe_resume, prepare_run_folder, remove_created_run_folder, save_args,
)
from training.state import Checkpoints, CheckpointWriteError, best_candidate, load_training_state
from utils.distributed import (
    all_reduce_mean, broadcast_object, communication_device, get_rank, get_world_size,
    is_dist_avail_and_initialized, is_main_process,
)
from utils.logger import TEXT_LOGGER_NAME, TensorBoardWriter, setup_text_log
from utils.optim import build_optimizer, lr_at_iteration, set_lr
from utils.precision import autocast, grad_scaler
from utils.seeding import restore_rng_state, seed_everything


def validate_training_args(args: argparse.Namespace) -> None:
    """Refuse impossible settings before any data is read or file written."""
    checks = [
        (args.batch_size >= 1, f"--batch_size must be at least 1 pair per process, got {args.batch_size}"),
        (args.accum_steps >= 1, f"--accum_steps must be at least 1, got {args.accum_steps}"),
        (args.iterations >= 1, f"--iterations must be at least 1, got {args.iterations}"),
        (args.warmup >= 0, f"--warmup must be >= 0, got {args.warmup}"),
        (args.warmup <= args.iterations,
         f"--warmup {args.warmup} is longer than the whole run (--iterations {args.iterations})"),
        (args.step_after >= 1, f"--step_after must be at least 1, got {args.step_after}"),
        (args.neg_to_pos_ratio >= 1, f"--neg_to_pos_ratio must be at least 1, got {args.neg_to_pos_ratio}"),
        (args.learning_rate > 0, f"--learning_rate must be positive, got {args.learning_rate}"),
        (args.clip_grad is None or args.clip_grad > 0, f"--clip_grad must be positive, got {args.clip_grad}"),
        (min(args.log_period, args.save_period, args.eval_period) >= 1,
         "--log_period, --save_period and --eval_period must be at least 1"),
        (not (args.resume and args.pretrained), "--resume and --pretrained exclude each other"),
        # torch's SyncBatchNorm only runs on GPUs; without this check the first forward fails mid-run.
        (not (args.sync_bn and getattr(args, "distributed", False) and torch.device(args.device).type != "cuda"),
         f"--sync_bn true needs --device cuda (got {args.device}); use --sync_bn false on the CPU"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def build_model(args: argparse.Namespace, device: torch.device) -> ReSeND:
    """ResNet backbone + relational module, initialised from --pretrained or --backbone_weights."""
    n_outputs = 1 if args.loss_function == "L2" else 2
    if args.pretrained:
        loaded = load_model_folder(args.pretrained, n_heads=args.transf_n_heads, device="cpu")
        if loaded.objective != args.loss_function:
            raise ValueError(f"--pretrained {args.pretrained!r} holds a {loaded.objective} head but "
                             f"--loss_function is {args.loss_function}")
        model = ReSeND(loaded.backbone, loaded.relational)
    else:
        weights = None if args.backbone_weights == "none" else args.backbone_weights
        backbone = ResNetBackbone(args.network, weights=weights)
        relational = RelationalTransformer(feat_dim=backbone.feat_dim, n_outputs=n_outputs,
                                           depth=args.transf_depth, n_heads=args.transf_n_heads,
                                           head_init=args.head_init)
        model = ReSeND(backbone, relational)
    return model.to(device).to(memory_format=torch.channels_last)


def periodic_eval_splits(args: argparse.Namespace) -> Tuple[List[EvalSplit], str]:
    """(splits evaluated during training, a line for the log saying which or why none)."""
    dataset = args.eval_dataset
    explicit = dataset is not None
    if dataset is None:
        # E.g. the authors evaluate on DomainNet_IN_OUT while training on ImageNet.
        dataset = DEFAULT_EVAL_DATASET.get(args.dataset, "none")
    if dataset.lower() == "none":
        return [], "no periodic evaluation"
    try:
        splits = load_splits(dataset, args.eval_target, args.data_root, args.path_to_txt, args.source_dir,
                             args.target_dir)
    except (DataError, FileNotFoundError) as error:
        if explicit:
            raise
        # The training itself does not depend on the evaluation data.
        return [], f"periodic evaluation on {dataset} skipped: {error}"
    return splits, f"periodic evaluation on {dataset}: " + ", ".join(s.target for s in splits)


class PeriodStats:
    """Sums over a logging period: loss, accuracy on same- and different-class pairs, output range."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        # loss_sum, n, same_correct, same_total, diff_correct, diff_total
        self.sums = torch.zeros(6, dtype=torch.float64, device=device)
        # On the device: reading them every micro-step would make each step wait for the GPU.
        self.out_min = torch.tensor(math.inf, device=device)
        self.out_max = torch.tensor(-math.inf, device=device)

    def update(self, loss: torch.Tensor, logits: torch.Tensor, relation: torch.Tensor,
               args: argparse.Namespace) -> None:
        """Add one micro-batch."""
        with torch.no_grad():
            different = predict_different(logits.float(), args.loss_function, args.sigmoid_compression,
                                          args.sigmoid_expansion)
            is_diff = relation.bool()
            correct = different == is_diff
            n = float(relation.numel())
            self.sums += torch.stack([loss.detach().double() * n,
                                      torch.tensor(n, dtype=torch.float64, device=self.device),
                                      (correct & ~is_diff).sum().double(), (~is_diff).sum().double(),
                                      (correct & is_diff).sum().double(), is_diff.sum().double()])
            if args.loss_function == "L2":
                out = l2_output(logits.float(), args.sigmoid_compression, args.sigmoid_expansion)
                self.out_min = torch.minimum(self.out_min, out.min().to(self.out_min.device))
                self.out_max = torch.maximum(self.out_max, out.max().to(self.out_max.device))

    def summary(self) -> Dict[str, float]:
        """Averages over the period and over every process."""
        sums = all_reduce_mean(self.sums) * get_world_size()
        loss_sum, n, same_ok, same_n, diff_ok, diff_n = sums.tolist()
        acc_same = same_ok / max(same_n, 1.0)
        acc_diff = diff_ok / max(diff_n, 1.0)
        return {"loss": loss_sum / max(n, 1.0), "acc_same": acc_same, "acc_diff": acc_diff,
                "acc_mean": (acc_same + acc_diff) / 2}


def collapse_warning(stats: PeriodStats, args: argparse.Namespace) -> Optional[str]:
    """A message when every L2 output sits at one saturated end (training cannot recover alone)."""
    out_min, out_max = float(stats.out_min), float(stats.out_max)
    if args.loss_function != "L2" or out_min == math.inf:
        return None
    half = args.sigmoid_expansion / 2
    spread = out_max - out_min
    if spread < 1e-3 * half and min(abs(out_min), abs(out_max)) > 0.99 * half:
        return (f"outputs collapsed: every pair scored {out_min:+.4f} (saturated at +/-{half}); "
                "the loss is stuck. Lower --learning_rate, use --clip_grad 1.0 or --head_init zero")
    return None


class NonFiniteError(ValueError):
    """A NaN or inf loss or weight: training stopped, and nothing from that point on was saved."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM ended training; the message says at which iteration and what is saved."""

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # 128 + the signal's number, as a shell reports a killed command


class _StopRequested(Exception):
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

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.first_bad = torch.full((), _NEVER, dtype=torch.int64, device=device)

    def record(self, loss: torch.Tensor, iteration: int) -> None:
        """Note a micro-step's loss (no host-device sync)."""
        self.first_bad.masked_fill_(~torch.isfinite(loss.detach()) & (self.first_bad == _NEVER), iteration)

    def check(self, model: torch.nn.Module, iteration: int, checkpoints: Checkpoints) -> None:
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
                             f"{checkpoints.describe_last()}; lower --learning_rate or set --clip_grad")


@dataclass
class _Progress:
    """The iteration the loop is in, for the message of a run that ends early."""

    iteration: int = 0


def backward_micro_batch(model: torch.nn.Module, images_a: torch.Tensor, images_b: torch.Tensor,
                         relation: torch.Tensor, args: argparse.Namespace, scaler: "torch.amp.GradScaler",
                         device: torch.device, last: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Add one micro-batch's gradient to `.grad`; returns its (unscaled loss, logits)."""
    # DDP all-reduces only on the last micro-step of an iteration; the others accumulate locally.
    sync = contextlib.nullcontext() if (last or not args.distributed) else model.no_sync()
    with sync:
        with autocast(device, args.amp):
            logits = model(images_a, images_b)
        loss = relation_loss(logits.float(), relation, args.loss_function,
                             args.sigmoid_compression, args.sigmoid_expansion)
        # DDP averages over processes; dividing by accum_steps makes the sum over micro-steps the
        # mean over every pair of the iteration, i.e. the gradient of one batch of the effective size.
        scaler.scale(loss / args.accum_steps).backward()
    return loss, logits


def run_training(args: argparse.Namespace) -> Tuple[str, List[EvalResult]]:
    """Train; returns the run folder and the last periodic evaluation's results (rank 0)."""
    validate_training_args(args)
    device = args.device
    samples = train_samples(args.dataset, args.data_root, path_to_txt=args.path_to_txt,
                            train_dir=args.train_dir, target=args.target,
                            cache_dir=os.path.join(args.checkpoint_folder_path, ".cache"))
    seed_everything(args.seed)
    stream = PairStream(samples, train_transform(args.image_size, args.min_scale, args.max_scale,
                                                 args.random_horiz_flip, args.jitter, args.prob_jitter,
                                                 args.random_grayscale),
                        args.neg_to_pos_ratio, args.class_balancing, args.batch_size, args.num_workers,
                        args.seed, get_rank(), get_world_size(), pin_memory=device.type == "cuda")
    settings = eval_settings(args)
    eval_splits, eval_note = periodic_eval_splits(args)
    model = build_model(args, device)
    # Every check above runs before the run folder exists: bad input leaves nothing behind.
    run = prepare_run_folder(args)
    checkpoints = Checkpoints(run.path, run.resume_generation, run.resume_iteration, run.best)
    progress = _Progress()
    stop = StopSignals()
    log = logging.getLogger(TEXT_LOGGER_NAME)
    tb_writer: Optional[TensorBoardWriter] = None
    try:
        log = setup_text_log(os.path.join(run.path, "out.txt"), enabled=is_main_process())
        with stop:
            tb_writer = TensorBoardWriter(os.path.join(run.path, "tensorboard"), enabled=is_main_process())
            return _train_in_run_folder(args, run, samples, stream, settings, eval_splits, eval_note, model, log,
                                        tb_writer, checkpoints, stop, progress)
    except BaseException as error:
        if tb_writer is not None:
            tb_writer.close()
        final = _ended_early(error, run, checkpoints, stop, progress, log)
        if final is error:
            raise
        raise final from error


def _ended_early(error: BaseException, run: RunFolder, checkpoints: Checkpoints, stop: StopSignals,
                 progress: _Progress, log: logging.Logger) -> BaseException:
    """The exception a run that stopped early ends with; removes the run folder if it saved nothing.

    A failed start (bad data in the first batches, a NaN before the first save, an interrupt) leaves
    no run folder behind, but only a folder this run created is removed, never one that existed.
    """
    # After a signal, other failures (a DataLoader worker that got the same SIGINT) are the interrupt;
    # input and write errors keep their own message.
    interrupted = (isinstance(error, (KeyboardInterrupt, _StopRequested))
                   or (bool(stop.signum) and not isinstance(error, (ValueError, OSError))))
    signum = int(getattr(error, "signum", 0) or stop.signum or signal.SIGINT)
    if interrupted:
        message = (f"interrupted by {signal.Signals(signum).name} at iteration {progress.iteration}; "
                   f"{checkpoints.describe_last()}")
    elif isinstance(error, (NonFiniteError, CheckpointWriteError)):
        message = str(error)  # already says where training stopped and what is saved
    else:
        message = f"training stopped at iteration {progress.iteration}: {type(error).__name__}: {error}"
    log.error(message)
    removed = False
    if run.created and not checkpoints.saved_by_this_run:
        setup_text_log(None, enabled=False)  # closes out.txt before its folder goes
        try:
            removed = remove_created_run_folder(run)
        except OSError as failure:  # reported, but the error that stopped training is the one raised
            log.error("could not remove the run folder %s: %s", run.path, failure)
        if removed:
            log.error("removed the run folder %s: this run created it and saved no checkpoint", run.path)
    suffix = f"; run folder {run.path} removed" if removed else ""
    if interrupted:
        return TrainingInterrupted(message + suffix, exit_code=128 + signum)
    if isinstance(error, NonFiniteError) and removed:
        return NonFiniteError(f"{error}{suffix}")
    return error


def _train_in_run_folder(args: argparse.Namespace, run: RunFolder, samples: List, stream: PairStream,
                         settings: object, eval_splits: List[EvalSplit], eval_note: str, model: ReSeND,
                         log: logging.Logger, tb_writer: TensorBoardWriter, checkpoints: Checkpoints,
                         stop: StopSignals, progress: _Progress) -> Tuple[str, List[EvalResult]]:
    """The training itself, in a run folder that exists; run_training handles how it ends early."""
    device = args.device
    folder = run.path
    for warning in run.warnings:
        log.warning(warning)
    if run.swept.removed:
        log.info("removed %d temp file(s) of killed saves: %s", len(run.swept.removed), ", ".join(run.swept.removed))
    unattributed = [path for path, reason in run.swept.left if reason == "no writer in its name"]
    if unattributed:
        log.warning("left %d temp file(s) of an older version whose writer is unknown (delete them when no "
                    "training or evaluation uses this folder): %s", len(unattributed), ", ".join(unattributed))

    optimizer = build_optimizer(model.parameters(), args.optimizer, args.learning_rate,
                                momentum=args.momentum, weight_decay=args.weight_decay)
    scaler = grad_scaler(device, args.amp)
    start_iteration, pairs_seen = 0, 0
    if run.resume_state is not None:
        state = load_training_state(run.resume_state, device)
        model.backbone.load_state_dict(state["backbone"])
        model.relational.load_state_dict(state["relational"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler.is_enabled() and not state["scaler"]:
            # Saved without fp16 loss scaling (--amp none or bf16, a change resume accepts).
            log.info("resume: --amp fp16 starts a new loss scale; the checkpoint was saved without one")
        else:
            scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"])
        start_iteration = state["iteration"]
        pairs_seen = state["pairs_seen"]
        (log.warning if run.overridden else log.info)(describe_resume(run))
    progress.iteration = start_iteration

    model_without_ddp = model
    if args.distributed:
        sync_bn = args.sync_bn if args.sync_bn is not None else device.type == "cuda"
        if sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            model_without_ddp = model
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        model_without_ddp = model.module

    save_args(run, args)
    tb_writer.add_text("args", "\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())), 0)
    log.info("run folder %s; %d training images, %d pairs per pass, %d micro-batches per pass per process",
             folder, len(samples), stream.pairs_per_pass, stream.batches_per_pass)
    log.info(eval_note)

    record = settings_record(args, settings, folder, model_without_ddp.backbone, model_without_ddp.relational, None)
    # The position in the pair stream is kept in pairs, so that a run resumed with another number
    # of processes or batch size continues where the data left off (exactly, when nothing changed).
    pairs_per_micro_step = args.batch_size * get_world_size()
    micro_step = pairs_seen // pairs_per_micro_step
    batches = stream.batches(micro_step)
    stats = PeriodStats(device)
    period_start, period_first_iteration = time.perf_counter(), start_iteration
    run_start = period_start
    watch = FiniteWatch(device)

    def save_generation(iteration: int) -> None:
        # Never save garbage: the check is collective, so every process saves or stops alike.
        watch.check(model_without_ddp, iteration, checkpoints)
        checkpoints.save(model_without_ddp, optimizer, scaler, iteration, micro_step * pairs_per_micro_step, args)

    model.train()
    results: List[EvalResult] = []
    evaluated = results
    for iteration in range(start_iteration + 1, args.iterations + 1):
        progress.iteration = iteration
        lr = lr_at_iteration(iteration - 1, args.learning_rate, args.warmup, args.step_after,
                             schedule=args.lr_schedule, total_iterations=args.iterations)
        set_lr(optimizer, lr)
        optimizer.zero_grad(set_to_none=True)
        for micro in range(args.accum_steps):
            _, (images_a, images_b, _, relation) = next(batches)
            micro_step += 1
            images_a = images_a.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            images_b = images_b.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            relation = relation.to(device, non_blocking=True).long()
            loss, logits = backward_micro_batch(model, images_a, images_b, relation, args, scaler, device,
                                                last=micro == args.accum_steps - 1)
            stats.update(loss, logits, relation, args)
            watch.record(loss, iteration)
        if args.clip_grad is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        scaler.step(optimizer)
        scaler.update()

        if iteration % args.log_period == 0 or iteration == args.iterations:
            summary = stats.summary()
            seconds = (time.perf_counter() - period_start) / max(1, iteration - period_first_iteration)
            eta = seconds * (args.iterations - iteration)
            log.info("it %d/%d  loss %.4f  acc_same %.3f  acc_diff %.3f  acc %.3f  lr %.2e  %.3f s/it  eta %s",
                     iteration, args.iterations, summary["loss"], summary["acc_same"], summary["acc_diff"],
                     summary["acc_mean"], lr, seconds, time.strftime("%H:%M:%S", time.gmtime(eta)))
            # Before TensorBoard, which would only warn about a NaN and record it.
            watch.check(model_without_ddp, iteration, checkpoints)
            for name, value in summary.items():
                tb_writer.add_scalar(f"train/{name}", value, iteration)
            tb_writer.add_scalar("train/lr", lr, iteration)
            tb_writer.add_scalar("train/seconds_per_iteration", seconds, iteration)
            warning = collapse_warning(stats, args)
            if warning:
                log.warning(warning)
            stats = PeriodStats(device)
            period_start, period_first_iteration = time.perf_counter(), iteration

        if iteration % args.save_period == 0 or iteration == args.iterations:
            save_generation(iteration)
        if eval_splits and (iteration % args.eval_period == 0 or iteration == args.iterations):
            results = evaluate_splits(eval_splits, model_without_ddp.backbone, model_without_ddp.relational,
                                      settings, device)
            # The numbers reach the log before any file is written: a failed write loses none of them.
            for result in results:
                log.info("eval it %d %s/%s %s: auroc %.4f fpr95 %.4f", iteration, result.dataset, result.target,
                         result.scorer, result.metrics["auroc"], result.metrics["fpr95"])
            group = write_results(results, folder, {**record, "iteration": iteration}, tb_writer, step=iteration,
                                  kind="periodic", warn=log.warning)
            if group is not None:
                log.info("eval it %d written to %s", iteration, group)
            model.train()
        if results is not evaluated:
            # A periodic evaluation ran: its generation becomes `best` when it scores highest so far.
            evaluated = results
            candidate = broadcast_object(best_candidate(results, iteration) if is_main_process() else None)
            if checkpoints.is_better(candidate):
                if checkpoints.last_iteration != iteration:
                    save_generation(iteration)
                checkpoints.mark_best(candidate)
                log.info("best checkpoint: iteration %d, %s %.4f (%s)", iteration, candidate["metric"],
                         candidate["score"], candidate["scorer"])
        check_point = (iteration % args.log_period == 0 or iteration % args.save_period == 0)
        signum = stop.agreed(check_point) if iteration < args.iterations else 0
        if signum:
            if args.save_on_interrupt and checkpoints.last_iteration != iteration:
                save_generation(iteration)
            raise _StopRequested(signum)
    tb_writer.close()
    log.info("done in %.1f s; run folder %s", time.perf_counter() - run_start, folder)
    return folder, results
