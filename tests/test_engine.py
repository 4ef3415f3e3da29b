"""The training engine (training/engine.py) driven directly, without train.py: a tiny pair model on tiny tensors.

One optimiser step's update is compared with the update computed from the published objective
(L2: MSE between e*sigmoid(c*x) - e/2 and -e/2 / +e/2; CE: cross-entropy) with plain torch
autograd; the loop's logs, saves, evaluations and stops are checked iteration by iteration; the
log line and the TensorBoard scalars are compared value by value; the period statistics are
checked exactly. Everything here runs in well under a second per test.
"""
import contextlib
import copy
import logging
import math
import signal
import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import training.engine as engine_module
from training.engine import Engine, Hooks, PeriodStats, Progress, backward_micro_batch, collapse_warning
from training.settings import Objective, Optimisation, RunSettings, Schedule
from training.stopping import FiniteWatch, NonFiniteError, StopRequested

CPU = torch.device("cpu")
# Not the defaults (10, 2): a test fails if either one is dropped or swapped on the way.
L2 = Objective(loss_function="L2", sigmoid_compression=1.5, sigmoid_expansion=3.0)
CE = Objective(loss_function="CE", sigmoid_compression=10.0, sigmoid_expansion=2.0)


class PairNet(nn.Module):
    """Logits [B, n_outputs] from the two images' mean colours; records what each forward saw."""

    def __init__(self, n_outputs=1, seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.head = nn.Linear(6, n_outputs)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(n_outputs, 6, generator=generator))
            self.head.bias.copy_(0.1 * torch.randn(n_outputs, generator=generator))
        self.seen = []

    def logits(self, a, b):
        return self.head(torch.cat([a.mean(dim=(2, 3)), b.mean(dim=(2, 3))], dim=1))

    def forward(self, a, b):
        out = self.logits(a, b)
        self.seen.append({"training": self.training, "dtype": out.dtype,
                          "channels_last": all(x.is_contiguous(memory_format=torch.channels_last)
                                               and not x.is_contiguous() for x in (a, b))})
        return out


def reference_loss(logits, relation, objective):
    """The objective from its formula (not models.objective)."""
    relation = relation.long()
    if objective.loss_function == "L2":
        c, e = objective.sigmoid_compression, objective.sigmoid_expansion
        out = e * torch.sigmoid(c * logits[:, 0]) - e / 2
        target = torch.where(relation == 1, e / 2, -e / 2)
        return ((out - target) ** 2).mean()
    log_p = torch.log_softmax(logits, dim=1)
    return -log_p[torch.arange(len(relation)), relation].mean()


def reference_step(model, micro_batches, objective, lr, clip=None):
    """Plain SGD on the mean loss over every pair of the iteration (equal micro-batches weigh equally)."""
    ref = copy.deepcopy(model)
    params = list(ref.parameters())
    for p in params:
        p.grad = None
    for a, b, relation in micro_batches:
        (reference_loss(ref.logits(a, b).float(), relation, objective) / len(micro_batches)).backward()
    grads = [p.grad.clone() for p in params]
    norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads))
    if clip is not None:
        grads = [g * min(1.0, clip / (norm + 1e-6)) for g in grads]
    return [(p - lr * g).detach() for p, g in zip(params, grads)], norm


def make_batches(sizes, seed=1, relations=None):
    """(pass index, (images_a, images_b, indices, relation)) per micro-batch, images [B, 3, 4, 5]."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i, size in enumerate(sizes):
        a = torch.randn(size, 3, 4, 5, generator=generator)
        b = torch.randn(size, 3, 4, 5, generator=generator)
        relation = (torch.arange(size) % 2 if relations is None else relations[i]).long()
        out.append((0, (a, b, torch.arange(size), relation)))
    return out


def plain(batches):
    return [(a, b, r) for _, (a, b, _, r) in batches]


class RecordingWriter:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))


class FakeStop:
    """StopSignals.agreed: records each check_point flag; returns `signum` from call number `at` on."""

    def __init__(self, at=None, signum=signal.SIGINT):
        self.calls, self.at, self.signum = [], at, signum

    def agreed(self, check_point):
        self.calls.append(check_point)
        return int(self.signum) if self.at is not None and len(self.calls) >= self.at else 0


class Records(logging.Handler):
    def __init__(self, events):
        super().__init__()
        self.events = events

    def emit(self, record):
        self.events.append((record.levelname, record.getMessage()))


def make_log(events):
    log = logging.getLogger(f"tests.test_engine.{id(events)}")
    log.handlers = [Records(events)]
    log.setLevel(logging.INFO)
    log.propagate = False
    return log


def make_engine(model, batches, *, objective=L2, accum_steps=1, clip_grad=None, lr=0.2, warmup=0, iterations=6,
                log_period=100, save_period=100, eval_period=100, save_on_interrupt=False, stop=None, start=0,
                amp="none", scaler=None):
    events = []
    schedule = Schedule(learning_rate=lr, warmup=warmup, step_after=1000, lr_schedule="step", iterations=iterations)
    optimisation = Optimisation(optimizer="sgd", momentum=0.0, weight_decay=0.0, accum_steps=accum_steps,
                                clip_grad=clip_grad, amp=amp, schedule=schedule)
    run = RunSettings(parent="unused", name="unused", log_period=log_period, save_period=save_period,
                      eval_period=eval_period, save_on_interrupt=save_on_interrupt)

    def evaluate(iteration):
        events.append(("evaluate", iteration))
        model.eval()

    engine = Engine(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=123.0),
                    scaler=scaler or torch.amp.GradScaler("cpu", enabled=False), batches=iter(batches),
                    objective=objective, optimisation=optimisation, run=run, device=CPU,
                    progress=Progress(iteration=start, micro_step=start * accum_steps),
                    hooks=Hooks(save=lambda iteration: events.append(("save", iteration)), evaluate=evaluate),
                    stop=stop or FakeStop(), watch=FiniteWatch(CPU, lambda: "no checkpoint saved"),
                    log=make_log(events), tb_writer=RecordingWriter())
    return engine, events


def a_scaler():
    """An active loss scaler (scale 8, doubled after every good step): grads are scaled until unscaled."""
    return torch.amp.GradScaler("cpu", init_scale=8.0, growth_factor=2.0, growth_interval=1, enabled=True)


# --- Engine.step ---------------------------------------------------------------------------------------

def test_step_applies_the_mean_gradient_of_its_micro_batches():
    model = PairNet()
    batches = make_batches([4, 4, 4], relations=[torch.tensor([0, 1, 1, 0]), torch.tensor([1, 1, 1, 0]),
                                                  torch.tensor([0, 0, 1, 1])])
    expected, _ = reference_step(model, plain(batches), L2, lr=0.1)
    # Warm-up over 4 iterations from 0.2: the step of (1-based) iteration 2 uses 0.2 * 2 / 4.
    engine, _ = make_engine(model, batches, accum_steps=3, warmup=4, scaler=a_scaler())
    for p in model.parameters():
        p.grad = torch.full_like(p, 100.0)  # left over from elsewhere: the step starts from zero
    stats = PeriodStats(CPU)
    assert engine.step(2, stats) == pytest.approx(0.1, rel=1e-12)
    assert [group["lr"] for group in engine.optimizer.param_groups] == [pytest.approx(0.1, rel=1e-12)]
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-6)
    assert engine.progress.micro_step == 3
    assert engine.scaler.get_scale() == 16.0  # scaler.update() ran once
    assert [seen["channels_last"] for seen in model.seen] == [True] * 3
    # Every micro-batch reached the statistics: 12 pairs, 5 same and 7 different.
    assert [stats.summary()["pairs"], *stats.sums[[2, 4]].tolist()] == [12.0, 5.0, 7.0]
    assert int(engine.watch.first_bad) == torch.iinfo(torch.int64).max


def test_step_clips_the_unscaled_gradient():
    model = PairNet(seed=3)
    batches = make_batches([5, 3], seed=4)
    expected, norm = reference_step(model, plain(batches), L2, lr=0.2, clip=0.05)
    assert norm > 0.2  # clipping is active (and a still-scaled gradient would be 8 times larger)
    engine, _ = make_engine(model, batches, accum_steps=2, clip_grad=0.05, scaler=a_scaler())
    engine.step(1, PeriodStats(CPU))
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-6)


def test_step_ce_objective_with_byte_relations():
    model = PairNet(n_outputs=2, seed=5)
    batches = make_batches([6], seed=6)
    batches = [(0, (a, b, i, r.to(torch.uint8))) for _, (a, b, i, r) in batches]
    expected, _ = reference_step(model, plain(batches), CE, lr=0.2)
    engine, _ = make_engine(model, batches, objective=CE)
    stats = PeriodStats(CPU)
    engine.step(1, stats)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-6)
    assert stats.summary()["pairs"] == 6.0


class Moved:
    """A batch tensor that records how it is moved to the device."""

    def __init__(self, tensor, log):
        self.tensor, self.log = tensor, log

    def to(self, *args, **kwargs):
        self.log.append((args, kwargs))
        return self.tensor


def test_step_copies_each_batch_tensor_to_the_device_without_blocking():
    log = []
    batches = [(0, (Moved(a, log), Moved(b, log), i, Moved(r, log))) for _, (a, b, i, r) in make_batches([3, 3])]
    engine, _ = make_engine(PairNet(), batches, accum_steps=2)
    engine.step(1, PeriodStats(CPU))
    assert log == [((CPU,), {"non_blocking": True})] * 6


def test_step_records_a_non_finite_loss_at_its_iteration():
    batches = make_batches([2, 2])
    batches[1][1][0][0, 0, 0, 0] = float("nan")
    engine, _ = make_engine(PairNet(), batches, accum_steps=2)
    engine.step(5, PeriodStats(CPU))
    assert int(engine.watch.first_bad) == 5


class SometimesUnused(PairNet):
    """A PairNet with an extra bias used only for batches of odd size."""

    def __init__(self):
        super().__init__()
        self.extra = nn.Parameter(torch.tensor([0.5]))

    def forward(self, a, b):
        out = super().forward(a, b)
        return out + self.extra if a.shape[0] % 2 else out


def test_a_parameter_without_gradient_in_an_iteration_is_not_moved():
    # Gradients are reset to None, not to zero: the optimiser then skips a parameter that this
    # iteration did not use, instead of moving it with its stale momentum.
    model = SometimesUnused()
    engine, _ = make_engine(model, make_batches([3, 2]))
    engine.optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine.step(1, PeriodStats(CPU))
    moved = model.extra.detach().clone()
    assert float(moved) != 0.5
    engine.step(2, PeriodStats(CPU))
    assert model.extra.grad is None and torch.equal(model.extra.detach(), moved)


def test_step_defers_the_all_reduce_to_its_last_micro_batch():
    model = FakeDDP(PairNet())
    engine, _ = make_engine(model, make_batches([2, 3, 2]), accum_steps=3)
    engine.step(1, PeriodStats(CPU))
    assert model.forward_unsynced == [True, True, False]
    assert model.backward_unsynced == [True, True, False]


def test_step_runs_the_forward_under_the_amp_setting():
    model = PairNet()
    engine, _ = make_engine(model, make_batches([2, 2]), accum_steps=2, amp="bf16")
    engine.step(1, PeriodStats(CPU))
    assert [seen["dtype"] for seen in model.seen] == [torch.bfloat16] * 2


# --- backward_micro_batch ----------------------------------------------------------------------------

def test_backward_micro_batch_returns_the_loss_and_adds_the_scaled_share_of_its_gradient():
    model = PairNet(seed=7)
    (a, b, relation), = plain(make_batches([5], seed=8))
    expected_logits = model.logits(a, b).detach()
    reference = copy.deepcopy(model)
    reference_loss(reference.logits(a, b), relation, L2).backward()
    optimisation = Optimisation(optimizer="sgd", momentum=0.0, weight_decay=0.0, accum_steps=4, clip_grad=None,
                                amp="none", schedule=Schedule(0.1, 0, 10, "step", 10))
    loss, logits = backward_micro_batch(model, a, b, relation, L2, optimisation, a_scaler(), CPU, last=True)
    torch.testing.assert_close(logits.detach(), expected_logits, rtol=0, atol=0)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.detach(), reference_loss(expected_logits, relation, L2), rtol=1e-6, atol=0)
    # The gradient added is scale (8) times that of loss / accum_steps (4).
    for p, r in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, 2.0 * r.grad, rtol=1e-5, atol=1e-7)


def test_backward_micro_batch_under_bf16_autocast_scores_the_float32_loss():
    model = PairNet(seed=9)
    (a, b, relation), = plain(make_batches([6], seed=10))
    optimisation = Optimisation(optimizer="sgd", momentum=0.0, weight_decay=0.0, accum_steps=1, clip_grad=None,
                                amp="bf16", schedule=Schedule(0.1, 0, 10, "step", 10))
    loss, logits = backward_micro_batch(model, a, b, relation, L2, optimisation,
                                        torch.amp.GradScaler("cpu", enabled=False), CPU, last=True)
    assert model.seen[-1]["dtype"] == torch.bfloat16 and logits.dtype == torch.bfloat16
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.detach(), reference_loss(logits.detach().float(), relation, L2), rtol=1e-6,
                               atol=0)
    optimisation = Optimisation(optimizer="sgd", momentum=0.0, weight_decay=0.0, accum_steps=1, clip_grad=None,
                                amp="none", schedule=Schedule(0.1, 0, 10, "step", 10))
    backward_micro_batch(model, a, b, relation, L2, optimisation, torch.amp.GradScaler("cpu", enabled=False), CPU,
                         last=True)
    assert model.seen[-1]["dtype"] == torch.float32


class FakeDDP(DistributedDataParallel):
    """A DistributedDataParallel stand-in (no process group): records when no_sync is active."""

    def __init__(self, module):
        nn.Module.__init__(self)
        self.module = module
        self.unsynced = False
        self.forward_unsynced, self.backward_unsynced = [], []
        module.head.weight.register_hook(self._on_grad)

    def _on_grad(self, grad):
        self.backward_unsynced.append(self.unsynced)
        return grad

    @contextlib.contextmanager
    def no_sync(self):
        self.unsynced = True
        try:
            yield
        finally:
            self.unsynced = False

    def forward(self, a, b):
        self.forward_unsynced.append(self.unsynced)
        return self.module(a, b)


def test_backward_micro_batch_defers_the_all_reduce_to_the_last_micro_step():
    ddp = FakeDDP(PairNet())
    optimisation = Optimisation(optimizer="sgd", momentum=0.0, weight_decay=0.0, accum_steps=3, clip_grad=None,
                                amp="none", schedule=Schedule(0.1, 0, 10, "step", 10))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for i, (a, b, relation) in enumerate(plain(make_batches([2, 2, 2]))):
        backward_micro_batch(ddp, a, b, relation, L2, optimisation, scaler, CPU, last=i == 2)
    assert ddp.forward_unsynced == [True, True, False]
    assert ddp.backward_unsynced == [True, True, False]
    # A plain module has no no_sync: nothing to defer.
    (a, b, relation), = plain(make_batches([2]))
    backward_micro_batch(PairNet(), a, b, relation, L2, optimisation, scaler, CPU, last=False)


# --- Engine.train ------------------------------------------------------------------------------------

def test_train_logs_saves_and_evaluates_on_their_periods(monkeypatch):
    losses = []  # (iteration, loss, pairs) of every micro-batch
    real_backward = engine_module.backward_micro_batch

    def recording_backward(model, images_a, *args, **kwargs):
        loss, logits = real_backward(model, images_a, *args, **kwargs)
        losses.append((engine.progress.iteration, float(loss.detach()), images_a.shape[0]))
        return loss, logits

    monkeypatch.setattr(engine_module, "backward_micro_batch", recording_backward)
    model = PairNet()
    stop = FakeStop()
    engine, events = make_engine(model, make_batches([2, 3] * 7, seed=11), accum_steps=2, iterations=7, log_period=3,
                                 save_period=2, eval_period=5, stop=stop, warmup=2)
    model.eval()  # train() switches it to training mode, and back after each evaluation
    engine.train()
    lines = [message for level, message in events if level == "INFO"]
    hooks = [event for event in events if event[0] in ("save", "evaluate")]
    assert [int(line.split()[1].split("/")[0]) for line in lines] == [3, 6, 7]
    assert all(line.split()[1].endswith("/7") for line in lines)
    assert hooks == [("save", 2), ("save", 4), ("evaluate", 5), ("save", 6), ("save", 7), ("evaluate", 7)]
    # In one iteration: the log line first, then the save, then the evaluation.
    assert [e[:2] if e[0] != "INFO" else ("log", int(e[1].split()[1].split("/")[0])) for e in events][-3:] == [
        ("log", 7), ("save", 7), ("evaluate", 7)]
    assert all(seen["training"] for seen in model.seen) and len(model.seen) == 14
    # The stop signals are consulted after every iteration but the last; check points at log or save periods.
    assert stop.calls == [False, True, True, True, False, True]
    assert engine.progress.iteration == 7 and engine.progress.micro_step == 14
    # Each period's loss is the pair-weighted mean over that period only; the lr is the iteration's.
    tb = {(tag, step): value for tag, value, step in engine.tb_writer.scalars}
    for first, last in ((1, 3), (4, 6), (7, 7)):
        period = [(loss, n) for it, loss, n in losses if first <= it <= last]
        expected = sum(loss * n for loss, n in period) / sum(n for _, n in period)
        assert tb[("train/loss", last)] == pytest.approx(expected, rel=1e-6)
        assert tb[("train/lr", last)] == pytest.approx(engine.optimisation.schedule.lr(last), rel=1e-12)


def test_train_keeps_its_period_statistics_on_the_engine_device(monkeypatch):
    created = []

    class RecordingStats(PeriodStats):
        def __init__(self, device):
            created.append(device)
            super().__init__(device)

    monkeypatch.setattr(engine_module, "PeriodStats", RecordingStats)
    engine, _ = make_engine(PairNet(), make_batches([2] * 4), iterations=4, log_period=2)
    engine.train()
    assert created == [CPU] * 3  # the first period's, then a fresh one after each log line


def test_train_continues_after_the_resumed_iteration():
    model = PairNet()
    engine, events = make_engine(model, make_batches([2] * 3), iterations=6, log_period=2, save_period=4, start=3)
    engine.train()
    assert len(model.seen) == 3  # iterations 4, 5, 6
    assert [e for e in events if e[0] != "INFO"] == [("save", 4), ("save", 6), ("evaluate", 6)]
    assert [message.split()[1] for level, message in events if level == "INFO"] == ["4/6", "6/6"]


@pytest.mark.parametrize("save_on_interrupt", [False, True])
def test_a_stop_signal_ends_the_loop_after_the_iteration(save_on_interrupt):
    stop = FakeStop(at=2, signum=signal.SIGTERM)
    model = PairNet()
    engine, events = make_engine(model, make_batches([2] * 6), iterations=6, log_period=2,
                                 save_on_interrupt=save_on_interrupt, stop=stop)
    with pytest.raises(StopRequested) as caught:
        engine.train()
    assert caught.value.signum == signal.SIGTERM
    assert len(model.seen) == 2 and engine.progress.iteration == 2
    assert [e for e in events if e[0] != "INFO"] == ([("save", 2)] if save_on_interrupt else [])


def test_the_last_iteration_does_not_consult_the_stop_signals():
    stop = FakeStop(at=1)
    engine, events = make_engine(PairNet(), make_batches([2]), iterations=1)
    engine.stop = stop
    engine.train()
    assert stop.calls == [] and [e for e in events if e[0] != "INFO"] == [("save", 1), ("evaluate", 1)]


# --- Engine.log_period -------------------------------------------------------------------------------

def scripted_clock(monkeypatch, times):
    times = list(times)
    monkeypatch.setattr(engine_module, "time", SimpleNamespace(perf_counter=lambda: times.pop(0),
                                                               strftime=time.strftime, gmtime=time.gmtime))
    return times


def known_stats(objective=L2):
    """11 pairs: loss 0.3 (float32); same 3 of 4 right, different 5 of 7 right."""
    stats = PeriodStats(CPU)
    stats.sums = torch.tensor([float(torch.tensor(0.3)) * 11, 3.0, 4.0, 5.0, 7.0], dtype=torch.float64)
    stats.out_min, stats.out_max = torch.tensor(-0.5), torch.tensor(0.5)
    return stats


def test_log_period_line_and_scalars(monkeypatch):
    engine, events = make_engine(PairNet(), [], iterations=10)
    times = scripted_clock(monkeypatch, [100.5, 200.0, 200.0 + 1861.5, 300.0])
    engine._period = (100.0, 4)
    engine.log_period(6, 0.0125, known_stats())
    loss = float(torch.tensor(0.3))
    # 0.5 s for 2 iterations; 4 iterations left; 11 pairs in 0.5 s.
    assert events == [("INFO", f"it 6/10  loss {loss:.4f}  acc_same 0.750  acc_diff 0.714  acc 0.732  lr 1.25e-02  "
                               "0.250 s/it  22 pairs/s  eta 00:00:01")]
    assert engine.tb_writer.scalars == [
        ("train/loss", pytest.approx(loss, rel=1e-12), 6), ("train/acc_same", 0.75, 6),
        ("train/acc_diff", pytest.approx(5 / 7, rel=1e-12), 6), ("train/acc_mean", pytest.approx((0.75 + 5 / 7) / 2), 6),
        ("train/lr", 0.0125, 6), ("train/seconds_per_iteration", 0.25, 6), ("train/pairs_per_second", 22.0, 6)]
    assert engine._period == (200.0, 6)
    # One iteration later, 1861.5 s on: 3 iterations left at 1861.5 s/it.
    engine.log_period(7, 0.5, known_stats())
    assert events[-1][1].endswith("lr 5.00e-01  1861.500 s/it  0 pairs/s  eta 01:33:04")
    assert engine._period == (300.0, 7) and times == []


def test_log_period_stops_on_non_finite_weights_before_tensorboard(monkeypatch):
    model = PairNet()
    with torch.no_grad():
        model.head.bias[0] = float("inf")
    engine, events = make_engine(model, [], iterations=10)
    scripted_clock(monkeypatch, [1.0])
    engine._period = (0.5, 5)
    with pytest.raises(NonFiniteError, match=r"^non-finite weights at iteration 6: training stopped at iteration 6 "
                                             r"without saving it; no checkpoint saved; lower --learning_rate or set "
                                             r"--clip_grad$"):
        engine.log_period(6, 0.1, known_stats())
    assert len(events) == 1 and engine.tb_writer.scalars == []


def test_log_period_warns_when_the_outputs_collapsed(monkeypatch):
    engine, events = make_engine(PairNet(), [], iterations=10)
    scripted_clock(monkeypatch, [1.0, 2.0, 3.0, 4.0])
    collapsed = known_stats()
    collapsed.out_min, collapsed.out_max = torch.tensor(1.4999), torch.tensor(1.49995)
    engine.log_period(6, 0.1, collapsed)
    assert events[1] == ("WARNING", "outputs collapsed: every pair scored +1.4999 (saturated at +/-1.5); the loss "
                                    "is stuck. Lower --learning_rate, use --clip_grad 1.0 or --head_init zero")
    engine.log_period(7, 0.1, known_stats())
    assert [level for level, _ in events] == ["INFO", "WARNING", "INFO"]


# --- PeriodStats -------------------------------------------------------------------------------------

def l2_out(logits, objective=L2):
    c, e = objective.sigmoid_compression, objective.sigmoid_expansion
    return e * torch.sigmoid(c * logits.double()) - e / 2


def test_period_stats_sum_exactly_over_micro_batches():
    stats = PeriodStats(CPU)
    # Batch 1: relations same, same, same, diff; L2 predicts "different" where the logit is > 0.
    logits1 = torch.tensor([[-1.0], [0.5], [-2.0], [3.0]])
    stats.update(torch.tensor(1 / 3), logits1, torch.tensor([0, 0, 0, 1]), L2)
    # Batch 2: diff, diff, same: one different pair missed.
    logits2 = torch.tensor([[-0.5], [0.7], [-1.0]])
    stats.update(torch.tensor(0.1), logits2, torch.tensor([1, 1, 0]), L2)
    l1, l2 = float(torch.tensor(1 / 3)), float(torch.tensor(0.1))
    summary = stats.summary()
    # float64 sums: the float32 losses times the pair counts are kept exactly.
    assert summary == {"loss": (l1 * 4 + l2 * 3) / 7, "acc_same": 3 / 4, "acc_diff": 2 / 3,
                       "acc_mean": (3 / 4 + 2 / 3) / 2, "pairs": 7.0}
    outputs = l2_out(torch.cat([logits1, logits2]))
    assert float(stats.out_min) == pytest.approx(float(outputs.min()), abs=1e-6)
    assert float(stats.out_max) == pytest.approx(float(outputs.max()), abs=1e-6)


def test_period_stats_of_one_pair_and_of_none():
    assert PeriodStats(CPU).summary() == {"loss": 0.0, "acc_same": 0.0, "acc_diff": 0.0, "acc_mean": 0.0,
                                          "pairs": 0.0}
    same = PeriodStats(CPU)
    same.update(torch.tensor(0.75), torch.tensor([[-1.0]]), torch.tensor([0]), L2)
    assert same.summary() == {"loss": 0.75, "acc_same": 1.0, "acc_diff": 0.0, "acc_mean": 0.5, "pairs": 1.0}
    different = PeriodStats(CPU)
    different.update(torch.tensor(0.25), torch.tensor([[2.0]]), torch.tensor([1]), L2)
    assert different.summary() == {"loss": 0.25, "acc_same": 0.0, "acc_diff": 1.0, "acc_mean": 0.5, "pairs": 1.0}


def test_period_stats_ce_predicts_with_the_argmax_and_tracks_no_output_range():
    stats = PeriodStats(CPU)
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, -1.0], [-2.0, -1.0]])
    stats.update(torch.tensor(0.5), logits, torch.tensor([0, 1, 1, 1]), CE)
    assert stats.summary() == {"loss": 0.5, "acc_same": 1.0, "acc_diff": 2 / 3, "acc_mean": (1 + 2 / 3) / 2,
                               "pairs": 4.0}
    assert float(stats.out_min) == math.inf and float(stats.out_max) == -math.inf


def test_period_stats_l2_uses_the_objective_compression_and_expansion():
    stats = PeriodStats(CPU)
    logits = torch.tensor([[0.4], [-0.2]])
    stats.update(torch.tensor(0.0), logits, torch.tensor([1, 0]), L2)
    outputs = l2_out(logits)  # c = 1.5, e = 3: not the defaults
    assert float(stats.out_max) == pytest.approx(float(outputs.max()), rel=1e-6)
    assert float(stats.out_min) == pytest.approx(float(outputs.min()), rel=1e-6)


def test_period_stats_predict_with_the_objective_compression_and_expansion():
    # "Different" is predicted where the L2 output e*sigmoid(c*x) - e/2 is positive. For logits this
    # close to 0 float32 rounds sigmoid(c*x) to exactly 1/2 below a threshold that depends on c, so
    # the count of pairs predicted "different" tells which c was used. (e does not matter: in
    # float32 e*s - e/2 > 0 exactly when s > 1/2, for every e > 0; tests/MUTATION.md.)
    logits = (torch.arange(1, 41, dtype=torch.float32) * 5e-9).unsqueeze(1)
    relation = torch.ones(40, dtype=torch.long)

    def predicted_different(c, e):
        return int((e * torch.sigmoid(c * logits[:, 0]) - e / 2 > 0).sum())

    expected = predicted_different(1.5, 3.0)
    assert 0 < expected < 40
    assert expected != predicted_different(10.0, 2.0) and expected != predicted_different(3.0, 2.0)
    stats = PeriodStats(CPU)
    stats.update(torch.tensor(0.0), logits, relation, L2)
    assert stats.sums[3].item() == expected and stats.sums[4].item() == 40


def test_period_stats_add_up_every_process(monkeypatch):
    stats = PeriodStats(CPU)
    stats.update(torch.tensor(0.5), torch.tensor([[-1.0], [1.0]]), torch.tensor([0, 0]), L2)
    other = torch.tensor([0.25 * 6, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64)  # the other process's sums
    monkeypatch.setattr(engine_module, "all_reduce_mean", lambda sums: (sums + other) / 2)
    monkeypatch.setattr(engine_module, "get_world_size", lambda: 2)
    assert stats.summary() == {"loss": (0.5 * 2 + 0.25 * 6) / 8, "acc_same": 2 / 4, "acc_diff": 3 / 4,
                               "acc_mean": (2 / 4 + 3 / 4) / 2, "pairs": 8.0}


def test_period_stats_stay_on_their_device_whatever_the_default_device():
    # On a GPU the sums live on the training device; here the CPU plays it and "meta" is the default
    # device: a tensor created without the device lands on meta and the sums cannot be read.
    logits, relation = torch.tensor([[-1.0], [0.5], [2.0]]), torch.tensor([0, 0, 1])
    with torch.device("meta"):
        stats = PeriodStats(CPU)
        stats.update(torch.tensor(0.5, device=CPU), logits, relation, L2)
        summary = stats.summary()
        out_min, out_max = float(stats.out_min), float(stats.out_max)
    assert summary == {"loss": 0.5, "acc_same": 0.5, "acc_diff": 1.0, "acc_mean": 0.75, "pairs": 3.0}
    assert out_min == pytest.approx(float(l2_out(torch.tensor([-1.0]))), rel=1e-6)
    assert out_max == pytest.approx(float(l2_out(torch.tensor([2.0]))), rel=1e-6)


# --- collapse_warning --------------------------------------------------------------------------------

def stats_with_range(out_min, out_max):
    stats = PeriodStats(CPU)
    stats.out_min, stats.out_max = torch.tensor(out_min, dtype=torch.float64), torch.tensor(out_max,
                                                                                            dtype=torch.float64)
    return stats


def l2(expansion):
    return Objective(loss_function="L2", sigmoid_compression=10.0, sigmoid_expansion=expansion)


def test_collapse_warning_at_either_saturated_end():
    objective = Objective(loss_function="L2", sigmoid_compression=10.0, sigmoid_expansion=2.0)
    saturated = PeriodStats(CPU)
    saturated.update(torch.tensor(2.0), torch.full((4, 1), -30.0), torch.tensor([0, 1, 0, 1]), objective)
    assert collapse_warning(saturated, objective) == (
        "outputs collapsed: every pair scored -1.0000 (saturated at +/-1.0); the loss is stuck. "
        "Lower --learning_rate, use --clip_grad 1.0 or --head_init zero")
    assert collapse_warning(stats_with_range(1.0, 1.0), objective).startswith(
        "outputs collapsed: every pair scored +1.0000 (saturated at +/-1.0)")
    healthy = PeriodStats(CPU)
    healthy.update(torch.tensor(0.5), torch.tensor([[-0.2], [0.3], [-0.1], [0.05]]), torch.tensor([0, 1, 0, 1]),
                   objective)
    assert collapse_warning(healthy, objective) is None


def test_collapse_warning_needs_an_l2_period_with_outputs():
    assert collapse_warning(PeriodStats(CPU), l2(2.0)) is None  # no micro-batch yet
    assert collapse_warning(stats_with_range(-1.0, -1.0), CE) is None


@pytest.mark.parametrize("expansion, out_min, out_max, warns", [
    (2.0, 0.0, 0.0, False),               # no spread, but in the middle: not saturated
    (2.0, -1.0, -0.99, False),            # saturated but spread over 1 % of e/2
    (2000.0, -1000.0, -999.0, False),     # spread exactly 1e-3 * e/2: not below it
    (2000.0, -1000.0, -999.5, True),      # spread below 1e-3 * e/2 (= 1 here)
    (200.0, -99.0, -99.0, False),         # exactly 0.99 * e/2: not beyond it
    (200.0, 99.5, 99.5, True),
    (2000.0, -500.0, -500.0, False),      # half way: far from saturated
])
def test_collapse_warning_thresholds_scale_with_the_expansion(expansion, out_min, out_max, warns):
    assert (collapse_warning(stats_with_range(out_min, out_max), l2(expansion)) is not None) == warns
