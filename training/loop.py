"""The iteration-based training loop (one code path for 1 and N processes)."""
import argparse
import contextlib
import math
import os
import time
from typing import Dict, List, Optional, Tuple

import torch
from torch.nn.parallel import DistributedDataParallel

from datasets.benchmarks import EvalSplit
from datasets.image_lists import DataError
from datasets.train_lists import train_samples
from datasets.transforms import train_transform
from evaluation.evaluate import EvalResult
from evaluation.run import eval_settings, evaluate_splits, load_splits, settings_record, write_results
from models.backbone import ResNetBackbone
from models.checkpoint import load_model_folder
from models.objective import l2_output, predict_different, relation_loss
from models.relational import RelationalTransformer
from models.resend import ReSeND
from training.pair_stream import PairStream
from training.run_folder import prepare_run_folder, save_args
from training.state import load_training_state, save_training_state
from utils.distributed import all_reduce_mean, get_rank, get_world_size, is_main_process
from utils.logger import TensorBoardWriter, setup_text_log
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
        # The authors evaluate on DomainNet_IN_OUT while training on ImageNet.
        dataset = "DomainNet_IN_OUT" if args.dataset == "ImageNet" else "none"
    if dataset.lower() == "none":
        return [], "no periodic evaluation"
    try:
        splits = load_splits(args, dataset, args.eval_target)
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
        self.out_min = math.inf
        self.out_max = -math.inf

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
                self.out_min = min(self.out_min, float(out.min()))
                self.out_max = max(self.out_max, float(out.max()))

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
    if args.loss_function != "L2" or stats.out_min == math.inf:
        return None
    half = args.sigmoid_expansion / 2
    spread = stats.out_max - stats.out_min
    if spread < 1e-3 * half and min(abs(stats.out_min), abs(stats.out_max)) > 0.99 * half:
        return (f"outputs collapsed: every pair scored {stats.out_min:+.4f} (saturated at +/-{half}); "
                "the loss is stuck. Lower --learning_rate, use --clip_grad 1.0 or --head_init zero")
    return None


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
    folder, resume_from = prepare_run_folder(args)
    log = setup_text_log(os.path.join(folder, "out.txt"), enabled=is_main_process())

    optimizer = build_optimizer(model.parameters(), args.optimizer, args.learning_rate,
                                momentum=args.momentum, weight_decay=args.weight_decay)
    scaler = grad_scaler(device, args.amp)
    start_iteration, pairs_seen = 0, 0
    if resume_from is not None:
        state = load_training_state(resume_from, device)
        model.backbone.load_state_dict(state["backbone"])
        model.relational.load_state_dict(state["relational"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"])
        start_iteration = state["iteration"]
        pairs_seen = state["pairs_seen"]
        log.info("resumed from %s at iteration %d", resume_from, start_iteration)

    model_without_ddp = model
    if args.distributed:
        sync_bn = args.sync_bn if args.sync_bn is not None else device.type == "cuda"
        if sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            model_without_ddp = model
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        model_without_ddp = model.module

    save_args(folder, args)
    tb_writer = TensorBoardWriter(os.path.join(folder, "tensorboard"), enabled=is_main_process())
    tb_writer.add_text("args", "\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())), 0)
    log.info("run folder %s; %d training images, %d pairs per pass, %d micro-batches per pass per process",
             folder, len(samples), stream.pairs_per_pass, stream.batches_per_pass)
    log.info(eval_note)

    record = settings_record(args, settings, folder, args.network, args.loss_function, None)
    # The position in the pair stream is kept in pairs, so that a run resumed with another number
    # of processes or batch size continues where the data left off (exactly, when nothing changed).
    pairs_per_micro_step = args.batch_size * get_world_size()
    micro_step = pairs_seen // pairs_per_micro_step
    batches = stream.batches(micro_step)
    stats = PeriodStats(device)
    period_start, period_first_iteration = time.perf_counter(), start_iteration
    run_start = period_start
    model.train()
    results: List[EvalResult] = []
    for iteration in range(start_iteration + 1, args.iterations + 1):
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
            if is_main_process():
                save_training_state(folder, model_without_ddp, optimizer, scaler, iteration,
                                    micro_step * pairs_per_micro_step, args)
        if eval_splits and (iteration % args.eval_period == 0 or iteration == args.iterations):
            results = evaluate_splits(eval_splits, model_without_ddp.backbone, model_without_ddp.relational,
                                      settings, device)
            write_results(results, folder, {**record, "iteration": iteration}, tb_writer, step=iteration)
            for result in results:
                log.info("eval it %d %s/%s: auroc %.4f fpr95 %.4f", iteration, result.dataset, result.target,
                         result.metrics["auroc"], result.metrics["fpr95"])
            model.train()
    tb_writer.close()
    log.info("done in %.1f s; run folder %s", time.perf_counter() - run_start, folder)
    return folder, results
