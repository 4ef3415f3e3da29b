"""Set-up of a training run around the engine: data, pair stream, model, optimiser, run folder, resume, DDP.

`run_training` builds everything from the typed settings, hands it to `training.engine.Engine`
(the step and the loop), and turns a run that ends early into the error it reports, removing the
run folder when this run created it and saved nothing.
"""
import logging
import os
import signal
import time
from typing import Callable, List, Optional, Tuple

import torch
from torch.nn.parallel import DistributedDataParallel

from datasets.benchmarks import EvalSplit
from datasets.image_lists import DataError, Sample
from datasets.train_lists import DEFAULT_EVAL_DATASET, train_samples
from evaluation.evaluate import EvalResult, evaluate_splits, load_splits
from evaluation.report import write_results
from models.backbone import ResNetBackbone
from models.backbone_file import BackboneFile, load_backbone_file
from models.checkpoint import CheckpointError, load_model_folder
from models.relational import RelationalTransformer
from models.resend import ReSeND
from training.engine import Engine, Hooks, Progress
from training.pair_stream import PairStream
from training.run_folder import (
    RunFolder, describe_resume, folder_size, prepare_run_folder, remove_created_run_folder, save_args,
)
from training.settings import (
    Augmentation, DataSettings, ModelSettings, Objective, PeriodicEvalSettings, ProcessSettings, TrainingSettings,
)
from training.state import Checkpoints, CheckpointWriteError, best_candidate, load_training_state
from training.stopping import FiniteWatch, NonFiniteError, StopRequested, StopSignals, TrainingInterrupted
from utils.distributed import broadcast_object, get_rank, get_world_size, is_main_process
from utils.logger import TEXT_LOGGER_NAME, TensorBoardWriter, setup_text_log
from utils.optim import build_optimizer
from utils.precision import grad_scaler
from utils.seeding import restore_rng_state, seed_everything


def build_model(model: ModelSettings, objective: Objective, device: torch.device) -> ReSeND:
    """ResNet backbone + relational module, initialised from --pretrained or --backbone_weights."""
    if model.pretrained:
        loaded = load_model_folder(model.pretrained, n_heads=model.transf_n_heads, device="cpu")
        if loaded.objective != objective.loss_function:
            raise ValueError(f"--pretrained {model.pretrained!r} holds a {loaded.objective} head but "
                             f"--loss_function is {objective.loss_function}")
        resend = ReSeND(loaded.backbone, loaded.relational)
    else:
        weights = None if model.backbone_weights == "none" else model.backbone_weights
        backbone = ResNetBackbone(model.network, weights=weights)
        relational = RelationalTransformer(feat_dim=backbone.feat_dim, n_outputs=objective.n_outputs,
                                           depth=model.transf_depth, n_heads=model.transf_n_heads,
                                           head_init=model.head_init)
        resend = ReSeND(backbone, relational)
    return resend.to(device).to(memory_format=torch.channels_last)


def build_pair_stream(samples: List[Sample], data: DataSettings, augmentation: Augmentation,
                      device: torch.device) -> PairStream:
    """This process's endless stream of augmented pair batches (augmented in the workers, or on `device`)."""
    settings = augmentation.settings()
    return PairStream(samples, settings.pil_transform(), data.neg_to_pos_ratio, data.class_balancing, data.batch_size,
                      data.num_workers, data.seed, get_rank(), get_world_size(), pin_memory=device.type == "cuda",
                      device_augment=(settings, device) if augmentation.on_device else None,
                      load_truncated=data.load_truncated_images)


def periodic_eval_splits(evaluation: PeriodicEvalSettings, training_dataset: str) -> Tuple[List[EvalSplit], str]:
    """(splits evaluated during training, a line for the log saying which or why none)."""
    dataset = evaluation.dataset
    explicit = dataset is not None
    if dataset is None:
        # E.g. the authors evaluate on DomainNet_IN_OUT while training on ImageNet.
        dataset = DEFAULT_EVAL_DATASET.get(training_dataset, "none")
    if dataset.lower() == "none":
        return [], "no periodic evaluation"
    try:
        splits = load_splits(dataset, evaluation.target, evaluation.data_root, evaluation.path_to_txt,
                             evaluation.source_dir, evaluation.target_dir)
    except (DataError, FileNotFoundError) as error:
        if explicit:
            raise
        # The training itself does not depend on the evaluation data.
        return [], f"periodic evaluation on {dataset} skipped: {error}"
    return splits, f"periodic evaluation on {dataset}: " + ", ".join(s.target for s in splits)


def load_eval_backbone(evaluation: PeriodicEvalSettings, model: ReSeND,
                       device: torch.device) -> Optional[Tuple[ResNetBackbone, BackboneFile]]:
    """The backbone of --backbone_checkpoint, which the periodic evaluation puts under the relational
    module being trained (None without it); its width is checked against the module's input."""
    path = evaluation.backbone_checkpoint
    if path is None:
        return None
    backbone, info = load_backbone_file(path)
    if backbone.feat_dim != model.relational.feat_dim:
        raise CheckpointError(f"--backbone_checkpoint {path} is a {info.network} with {backbone.feat_dim}-d features "
                              f"but the relational module being trained takes {model.relational.feat_dim}-d features "
                              f"(a {model.backbone.network} backbone)")
    return backbone.to(device).eval(), info


def restore_training_state(run: RunFolder, model: ReSeND, optimizer: torch.optim.Optimizer,
                           scaler: "torch.amp.GradScaler", device: torch.device,
                           log: logging.Logger) -> Tuple[int, int]:
    """Load the resumed checkpoint.pth into model, optimiser, scaler and RNGs; returns (iteration, pairs seen)."""
    if run.resume_state is None:
        return 0, 0
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
    (log.warning if run.overridden else log.info)(describe_resume(run))
    return state["iteration"], state["pairs_seen"]


def wrap_for_processes(model: ReSeND, process: ProcessSettings) -> torch.nn.Module:
    """The model as the step runs it: SyncBatchNorm and DistributedDataParallel when distributed."""
    if not process.distributed:
        return model
    if process.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device = process.device
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


class PeriodicEvaluation:
    """The engine's evaluation hook: evaluate, log and write the results, and switch `best` when they score highest.

    With `eval_backbone` (--backbone_checkpoint) the relational module being trained is scored on that
    backbone's features instead of the trained backbone's, and `best` follows those scores.
    """

    def __init__(self, splits: List[EvalSplit], evaluation: PeriodicEvalSettings, model: ReSeND, folder: str,
                 checkpoints: Checkpoints, save: Callable[[int], None], device: torch.device,
                 log: logging.Logger, tb_writer: TensorBoardWriter,
                 eval_backbone: Optional[Tuple[ResNetBackbone, BackboneFile]] = None) -> None:
        self.splits, self.scoring = splits, evaluation.scoring
        self.eval_backbone = None if eval_backbone is None else eval_backbone[0]
        backbone_file = None if eval_backbone is None else eval_backbone[1]
        self.record = evaluation.record(folder, model.backbone if self.eval_backbone is None else self.eval_backbone,
                                        model.relational, backbone_file=backbone_file)
        if backbone_file is not None and splits:
            log.info("periodic evaluation scores with the %s", backbone_file.describe())
        self.model, self.folder, self.checkpoints, self.save = model, folder, checkpoints, save
        self.device, self.log, self.tb_writer = device, log, tb_writer
        self.results: List[EvalResult] = []  # of the last evaluation

    def __call__(self, iteration: int) -> None:
        """Evaluate the model of `iteration` (nothing without evaluation data)."""
        if not self.splits:
            return
        backbone = self.model.backbone if self.eval_backbone is None else self.eval_backbone
        self.results = evaluate_splits(self.splits, backbone, self.model.relational, self.scoring, self.device)
        # The numbers reach the log before any file is written: a failed write loses none of them.
        for result in self.results:
            self.log.info("eval it %d %s/%s %s: auroc %.4f fpr95 %.4f", iteration, result.dataset, result.target,
                          result.scorer, result.metrics["auroc"], result.metrics["fpr95"])
        group = write_results(self.results, self.folder, {**self.record, "iteration": iteration}, self.tb_writer,
                              step=iteration, kind="periodic", warn=self.log.warning)
        if group is not None:
            self.log.info("eval it %d written to %s", iteration, group)
        # Its generation becomes `best` when it scores highest so far (rank 0 decides for every rank).
        candidate = broadcast_object(best_candidate(self.results, iteration) if is_main_process() else None)
        if self.checkpoints.is_better(candidate):
            self.save(iteration)
            self.checkpoints.mark_best(candidate)
            self.log.info("best checkpoint: iteration %d, %s %.4f (%s)", iteration, candidate["metric"],
                          candidate["score"], candidate["scorer"])


def run_training(settings: TrainingSettings) -> Tuple[str, List[EvalResult]]:
    """Train; returns the run folder and the last periodic evaluation's results (rank 0)."""
    data, device = settings.data, settings.process.device
    samples = train_samples(data.dataset, data.data_root, path_to_txt=data.path_to_txt, train_dir=data.train_dir,
                            target=data.target, cache_dir=os.path.join(settings.run.parent, ".cache"))
    seed_everything(data.seed)
    stream = build_pair_stream(samples, data, settings.augmentation, device)
    eval_splits, eval_note = periodic_eval_splits(settings.evaluation, data.dataset)
    model = build_model(settings.model, settings.objective, device)
    eval_backbone = load_eval_backbone(settings.evaluation, model, device)
    # Every check above runs before the run folder exists: bad input leaves nothing behind.
    run = prepare_run_folder(settings.run, settings.resume, settings.flags)
    checkpoints = Checkpoints(run.path, run.resume_generation, run.resume_iteration, run.best)
    progress = Progress(iteration=0, micro_step=0)
    stop = StopSignals()
    log = logging.getLogger(TEXT_LOGGER_NAME)
    tb_writer: Optional[TensorBoardWriter] = None
    try:
        log = setup_text_log(os.path.join(run.path, "out.txt"), enabled=is_main_process())
        with stop:
            tb_writer = TensorBoardWriter(os.path.join(run.path, "tensorboard"), enabled=is_main_process())
            return _train_in_run_folder(settings, run, samples, stream, eval_splits, eval_note, model, log,
                                        tb_writer, checkpoints, stop, progress, eval_backbone)
    except BaseException as error:
        if tb_writer is not None:
            tb_writer.close()
        final = _ended_early(error, run, checkpoints, stop, progress, log)
        if final is error:
            raise
        raise final from error


def _ended_early(error: BaseException, run: RunFolder, checkpoints: Checkpoints, stop: StopSignals,
                 progress: Progress, log: logging.Logger) -> BaseException:
    """The exception a run that stopped early ends with; removes the run folder if it saved nothing.

    A failed start (bad data in the first batches, a NaN before the first save, an interrupt) leaves
    no run folder behind, but only a folder this run created is removed, never one that existed.
    """
    # After a signal, other failures (a DataLoader worker that got the same SIGINT) are the interrupt;
    # input and write errors keep their own message.
    interrupted = (isinstance(error, (KeyboardInterrupt, StopRequested))
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


def _log_start(run: RunFolder, log: logging.Logger) -> None:
    """What the run folder's preparation found, once the text log exists."""
    for warning in run.warnings:
        log.warning(warning)
    if run.swept.removed:
        log.info("removed %d temp file(s) of killed saves: %s", len(run.swept.removed), ", ".join(run.swept.removed))
    unattributed = [path for path, reason in run.swept.left if reason == "no writer in its name"]
    if unattributed:
        log.warning("left %d temp file(s) of an older version whose writer is unknown (delete them when no "
                    "training or evaluation uses this folder): %s", len(unattributed), ", ".join(unattributed))


def _train_in_run_folder(settings: TrainingSettings, run: RunFolder, samples: List[Sample], stream: PairStream,
                         eval_splits: List[EvalSplit], eval_note: str, model: ReSeND, log: logging.Logger,
                         tb_writer: TensorBoardWriter, checkpoints: Checkpoints, stop: StopSignals,
                         progress: Progress, eval_backbone: Optional[Tuple[ResNetBackbone, BackboneFile]] = None
                         ) -> Tuple[str, List[EvalResult]]:
    """Build the optimiser, resume, wrap for DDP and run the engine, in a run folder that exists."""
    device, optimisation = settings.process.device, settings.optimisation
    _log_start(run, log)
    optimizer = build_optimizer(model.parameters(), optimisation.optimizer, optimisation.schedule.learning_rate,
                                momentum=optimisation.momentum, weight_decay=optimisation.weight_decay)
    scaler = grad_scaler(device, optimisation.amp)
    start_iteration, pairs_seen = restore_training_state(run, model, optimizer, scaler, device, log)
    # The position in the pair stream is kept in pairs, so that a run resumed with another number
    # of processes or batch size continues where the data left off (exactly, when nothing changed).
    pairs_per_micro_step = settings.data.batch_size * get_world_size()
    progress.iteration, progress.micro_step = start_iteration, pairs_seen // pairs_per_micro_step
    # Saved and checked through the unwrapped model: SyncBatchNorm converts it, DDP only wraps it.
    trained = wrap_for_processes(model, settings.process)
    unwrapped = trained.module if isinstance(trained, DistributedDataParallel) else trained

    save_args(run, settings.flags)
    tb_writer.add_text("args", "\n".join(f"{k}: {v}" for k, v in sorted(settings.flags.items())), 0)
    log.info("run folder %s; %d training images, %d pairs per pass, %d micro-batches per pass per process",
             run.path, len(samples), stream.pairs_per_pass, stream.batches_per_pass)
    log.info(eval_note)

    watch = FiniteWatch(device, checkpoints.describe_last)

    def save_generation(iteration: int) -> None:
        if checkpoints.last_iteration == iteration:
            return
        # Never save garbage: the check is collective, so every process saves or stops alike.
        watch.check(unwrapped, iteration)
        checkpoints.save(unwrapped, optimizer, scaler, iteration, progress.micro_step * pairs_per_micro_step,
                         settings.flags)

    evaluation = PeriodicEvaluation(eval_splits, settings.evaluation, unwrapped, run.path, checkpoints,
                                    save_generation, device, log, tb_writer, eval_backbone)
    engine = Engine(model=trained, optimizer=optimizer, scaler=scaler, batches=stream.batches(progress.micro_step),
                    objective=settings.objective, optimisation=optimisation, run=settings.run, device=device,
                    progress=progress, hooks=Hooks(save=save_generation, evaluate=evaluation), stop=stop,
                    watch=watch, log=log, tb_writer=tb_writer)
    started = time.perf_counter()
    engine.train()
    tb_writer.close()
    log.info("done in %.1f s; run folder %s (%s)", time.perf_counter() - started, run.path, folder_size(run.path))
    return run.path, evaluation.results
