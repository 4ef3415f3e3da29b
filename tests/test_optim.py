"""LARS equals the torchlars 0.1.2 update; SGD settings; learning-rate schedule values and errors."""
import math

import pytest
import torch

from utils.optim import STEP_GAMMA, build_optimizer, lr_at_iteration, set_lr

TRUST, EPS = 0.001, 1e-8


def _reference_lars_step(params, grads, buffers, lr, weight_decays, momentum):
    """The torchlars 0.1.2 update written out in plain torch (one weight decay per tensor)."""
    for i, (w, g, wd) in enumerate(zip(params, grads, weight_decays)):
        w_norm, g_norm = w.norm(), g.norm()
        if w_norm > 0 and g_norm > 0:
            adaptive = TRUST * w_norm / (g_norm + wd * w_norm + EPS)
        else:
            adaptive = torch.tensor(1.0, dtype=w.dtype)
        d = (g + wd * w) * adaptive
        buffers[i] = d.clone() if buffers[i] is None else buffers[i] * momentum + d
        w -= lr * buffers[i]


def _make_params():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    zero_grad = torch.randn(4, generator=generator, dtype=torch.float64)
    zero_init = torch.zeros(3, dtype=torch.float64)
    no_decay = torch.randn(5, generator=generator, dtype=torch.float64)
    return [weight, zero_grad, zero_init, no_decay]


def test_lars_matches_torchlars_update():
    wd, momentum = 5e-4, 0.9
    initial = _make_params()
    params = [torch.nn.Parameter(p.clone()) for p in initial]
    # The last tensor sits in a group without weight decay: torchlars still adapts its lr there.
    optimizer = build_optimizer([{"params": params[:3]}, {"params": params[3:], "weight_decay": 0.0}],
                                "lars", lr=0.5, momentum=momentum, weight_decay=wd)
    reference = [p.clone() for p in initial]
    buffers = [None] * len(reference)
    weight_decays = [wd, wd, wd, 0.0]
    generator = torch.Generator().manual_seed(1)
    for step, lr in enumerate([0.5, 0.5, 2.0, 1.0, 3.0]):
        grads = [torch.randn(p.shape, generator=generator, dtype=torch.float64) * (step + 1)
                 for p in initial]
        grads[1].zero_()
        for p, g in zip(params, grads):
            p.grad = g.clone()
        set_lr(optimizer, lr)
        optimizer.step()
        _reference_lars_step(reference, grads, buffers, lr, weight_decays, momentum)
        for p, r in zip(params, reference):
            torch.testing.assert_close(p.detach(), r, rtol=0, atol=1e-7)
    # The comparison is meaningful: every tensor moved by far more than the tolerance, and the
    # adapted tensors moved far less than plain SGD (lr * g, |g| ~ 1) would have moved them.
    moved = [float((p.detach() - p0).abs().max()) for p, p0 in zip(params, initial)]
    assert all(m > 1e-5 for m in moved), moved
    assert moved[0] < 0.1 and moved[3] < 0.1, moved
    # The zero-initialised tensor had adaptive = 1 on its first step: it moved like SGD.
    assert moved[2] > 0.1, moved


def test_lars_leaves_grad_untouched_and_skips_missing_grads():
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    optimizer = build_optimizer(params, "lars", lr=1.0, momentum=0.9, weight_decay=5e-4)
    params[0].grad = torch.full((3,), 2.0)
    optimizer.step()
    assert torch.equal(params[0].grad, torch.full((3,), 2.0))
    assert torch.equal(params[1].detach(), torch.ones(2))


def test_sgd_settings():
    optimizer = build_optimizer([torch.nn.Parameter(torch.ones(2))], "sgd", lr=0.1,
                                momentum=0.8, weight_decay=1e-4)
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.1, 0.8, 1e-4)
    assert group["nesterov"] is False and group["dampening"] == 0


def test_unknown_optimizer():
    with pytest.raises(ValueError, match="adamw"):
        build_optimizer([torch.nn.Parameter(torch.ones(2))], "adamw", lr=0.1, momentum=0.9, weight_decay=0.0)


def test_set_lr_sets_every_group():
    a, b = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
    optimizer = build_optimizer([{"params": [a]}, {"params": [b], "lr": 5.0}], "sgd", lr=0.1, momentum=0.9,
                                weight_decay=0.0)
    set_lr(optimizer, 0.25)
    assert [g["lr"] for g in optimizer.param_groups] == [0.25, 0.25]


@pytest.mark.parametrize("iteration, expected", [
    (0, 0.01),      # first warm-up step: base / warmup
    (4, 0.05),
    (9, 0.1),       # warmup - 1 reaches base_lr
    (10, 0.1),      # first step after warm-up
    (99, 0.1),
    (100, 0.01),    # step_after
    (150, 0.01),
    (200, 0.001),   # 2 * step_after
])
def test_step_schedule(iteration, expected):
    lr = lr_at_iteration(iteration, base_lr=0.1, warmup=10, step_after=100, schedule="step")
    assert lr == pytest.approx(expected, rel=1e-12)


def test_step_schedule_gamma_and_no_warmup():
    assert lr_at_iteration(0, 1.0, 0, 5, "step") == 1.0
    assert lr_at_iteration(10, 1.0, 0, 5, "step") == pytest.approx(STEP_GAMMA ** 2)
    assert lr_at_iteration(10, 1.0, 0, 5, "step", step_gamma=0.5) == pytest.approx(0.25)


@pytest.mark.parametrize("iteration, expected", [
    (0, 0.02),
    (9, 0.2),
    (10, 0.2),                                                # start of the decay
    (60, 0.1),                                                # half way
    (35, 0.1 * (1 + math.cos(math.pi * 0.25))),
    (110, 0.0),                                               # total_iterations
])
def test_cosine_schedule(iteration, expected):
    lr = lr_at_iteration(iteration, base_lr=0.2, warmup=10, step_after=None, schedule="cosine",
                         total_iterations=110)
    assert lr == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_cosine_with_warmup_equal_to_total():
    assert lr_at_iteration(4, 1.0, 5, None, "cosine", total_iterations=5) == pytest.approx(1.0)
    assert lr_at_iteration(5, 1.0, 5, None, "cosine", total_iterations=5) == 0.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(iteration=0, base_lr=0.1, warmup=20, schedule="step", step_after=5, total_iterations=10), "warmup"),
    (dict(iteration=11, base_lr=0.1, warmup=2, schedule="step", step_after=5, total_iterations=10), "iteration"),
    (dict(iteration=-1, base_lr=0.1, warmup=2, schedule="step", step_after=5), "iteration"),
    (dict(iteration=0, base_lr=-0.1, warmup=2, schedule="step", step_after=5), "base_lr"),
    (dict(iteration=0, base_lr=0.1, warmup=-2, schedule="step", step_after=5), "warmup"),
    (dict(iteration=0, base_lr=0.1, warmup=2, schedule="step", step_after=0), "step_after"),
    (dict(iteration=0, base_lr=0.1, warmup=2, schedule="step", step_after=-5), "step_after"),
    (dict(iteration=0, base_lr=0.1, warmup=2, schedule="step", step_after=5, step_gamma=0.0), "step_gamma"),
    (dict(iteration=0, base_lr=0.1, warmup=2, step_after=5, schedule="linear"), "linear"),
    (dict(iteration=0, base_lr=0.1, warmup=2, step_after=5, schedule="cosine"), "total_iterations"),
])
def test_schedule_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lr_at_iteration(**kwargs)


def test_lars_steps_with_the_learning_rate_it_was_built_with():
    # No set_lr: the first step uses build_optimizer's lr (timm's default would be 1.0).
    initial = _make_params()
    params = [torch.nn.Parameter(p.clone()) for p in initial]
    optimizer = build_optimizer(params, "lars", lr=0.05, momentum=0.9, weight_decay=5e-4)
    assert [group["lr"] for group in optimizer.param_groups] == [0.05]
    generator = torch.Generator().manual_seed(2)
    grads = [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in initial]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    optimizer.step()
    reference = [p.clone() for p in initial]
    _reference_lars_step(reference, grads, [None] * 4, 0.05, [5e-4] * 4, 0.9)
    for p, r in zip(params, reference):
        torch.testing.assert_close(p.detach(), r, rtol=0, atol=1e-12)
    assert float((params[2].detach() - initial[2]).abs().max()) > 0.01  # zero-initialised: moved like SGD


def test_unknown_optimizer_message_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"^unknown optimizer 'adamw'; valid: sgd, lars$"):
        build_optimizer([torch.nn.Parameter(torch.ones(2))], "adamw", lr=0.1, momentum=0.9, weight_decay=0.0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(iteration=0, base_lr=0.1, warmup=2, step_after=5, schedule="linear"),
     "unknown lr schedule 'linear'; valid: step, cosine"),
    (dict(iteration=-1, base_lr=0.1, warmup=2, schedule="step", step_after=5),
     "iteration must be a non-negative integer, got -1"),
    (dict(iteration=True, base_lr=0.1, warmup=2, schedule="step", step_after=5),
     "iteration must be a non-negative integer, got True"),
    (dict(iteration=1.0, base_lr=0.1, warmup=2, schedule="step", step_after=5),
     "iteration must be a non-negative integer, got 1.0"),
    (dict(iteration=0, base_lr=0.1, warmup=-2, schedule="step", step_after=5),
     "warmup must be a non-negative integer, got -2"),
    (dict(iteration=0, base_lr=0.1, warmup=False, schedule="step", step_after=5),
     "warmup must be a non-negative integer, got False"),
    (dict(iteration=0, base_lr=-0.1, warmup=2, schedule="step", step_after=5),
     "base_lr must be a non-negative number, got -0.1"),
    (dict(iteration=0, base_lr="0.1", warmup=2, schedule="step", step_after=5),
     "base_lr must be a non-negative number, got '0.1'"),
    (dict(iteration=0, base_lr=0.1, warmup=2, schedule="step", step_after=-5),
     "step_after must be a non-negative integer, got -5"),
    (dict(iteration=0, base_lr=0.1, warmup=2, schedule="step", step_after=None),
     "step_after must be a non-negative integer, got None"),
    (dict(iteration=0, base_lr=0.1, warmup=2, schedule="step", step_after=0),
     "step_after must be positive for the step schedule, got 0"),
    (dict(iteration=0, base_lr=0.1, warmup=2, schedule="step", step_after=5, step_gamma=0.0),
     "step_gamma must be a positive number, got 0.0"),
    (dict(iteration=0, base_lr=0.1, warmup=2, schedule="step", step_after=5, step_gamma="0.1"),
     "step_gamma must be a positive number, got '0.1'"),
    (dict(iteration=0, base_lr=0.1, warmup=2, step_after=5, schedule="cosine"),
     "the cosine schedule needs total_iterations"),
    (dict(iteration=0, base_lr=0.1, warmup=2, schedule="cosine", step_after=None, total_iterations=-1),
     "total_iterations must be a non-negative integer, got -1"),
    (dict(iteration=0, base_lr=0.1, warmup=20, schedule="step", step_after=5, total_iterations=10),
     "warmup (20) exceeds total_iterations (10)"),
    (dict(iteration=11, base_lr=0.1, warmup=2, schedule="step", step_after=5, total_iterations=10),
     "iteration 11 is past total_iterations (10)"),
])
def test_schedule_error_messages(kwargs, message):
    with pytest.raises(ValueError) as caught:
        lr_at_iteration(**kwargs)
    assert str(caught.value) == message


def test_schedule_boundaries_are_accepted():
    # base_lr 0 (a frozen run), iteration == total_iterations, warmup == total_iterations.
    assert lr_at_iteration(3, 0.0, 2, 5, "step") == 0.0
    assert lr_at_iteration(10, 0.4, 2, 4, "step", total_iterations=10) == pytest.approx(0.4 * STEP_GAMMA ** 2)
    assert lr_at_iteration(0, 0.4, 0, None, "cosine", total_iterations=0) == 0.0
    # Warm-up comes first even when a decay step would fall inside it.
    assert lr_at_iteration(0, 0.4, 4, 1, "step") == pytest.approx(0.1)
