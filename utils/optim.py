"""Optimizers (SGD, the authors' LARS) and the per-iteration learning-rate schedule."""
import math
from numbers import Integral, Real
from typing import Iterable

import torch
from timm.optim import Lars

OPTIMIZERS = ("sgd", "lars")
SCHEDULES = ("step", "cosine")

# The authors' step decay: the lr is multiplied by this every --step_after iterations.
STEP_GAMMA = 0.1
# torchlars 0.1.2 (the authors' LARS) constants.
LARS_TRUST_COEFFICIENT = 0.001
LARS_EPS = 1e-8


def build_optimizer(params: Iterable, name: str, lr: float, momentum: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay, or LARS computing exactly torchlars 0.1.2's update.

    LARS: per parameter tensor, adaptive = trust * ||w|| / (||g|| + wd * ||w|| + eps) if both norms
    are positive else 1; g <- (g + wd * w) * adaptive; then SGD with momentum (dampening 0, no
    Nesterov) and no further weight decay.
    """
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "lars":
        # always_adapt: torchlars adapts every tensor even when its weight decay is 0 (timm by default
        # skips the adaptation then); trust_clip off because torchlars is LARS, not LARC.
        return Lars(params, lr=lr, momentum=momentum, dampening=0, weight_decay=weight_decay,
                    nesterov=False, trust_coeff=LARS_TRUST_COEFFICIENT, eps=LARS_EPS,
                    trust_clip=False, always_adapt=True)
    raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")


def _check_non_negative_int(name: str, value: object) -> None:
    """Raise ValueError unless `value` is an integer >= 0."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def lr_at_iteration(iteration: int, base_lr: float, warmup: int, step_after: int | None,
                    schedule: str, total_iterations: int | None = None,
                    step_gamma: float = STEP_GAMMA) -> float:
    """Learning rate for the optimizer step of 0-based `iteration`.

    Warm-up: iteration i < warmup uses base_lr * (i + 1) / warmup, so the first step already moves
    and iteration warmup - 1 reaches base_lr. Afterwards "step" uses
    base_lr * step_gamma ** floor(i / step_after) (counted from iteration 0, not from the end of
    warm-up), and "cosine" decays as base_lr * (1 + cos(pi * (i - warmup) / (total - warmup))) / 2,
    i.e. base_lr at iteration `warmup` and 0 at iteration `total_iterations`.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    _check_non_negative_int("iteration", iteration)
    _check_non_negative_int("warmup", warmup)
    if not isinstance(base_lr, Real) or base_lr < 0:
        raise ValueError(f"base_lr must be a non-negative number, got {base_lr!r}")
    if schedule == "step":
        _check_non_negative_int("step_after", step_after)
        if step_after == 0:
            raise ValueError("step_after must be positive for the step schedule, got 0")
        if not isinstance(step_gamma, Real) or step_gamma <= 0:
            raise ValueError(f"step_gamma must be a positive number, got {step_gamma!r}")
    if total_iterations is None:
        if schedule == "cosine":
            raise ValueError("the cosine schedule needs total_iterations")
    else:
        _check_non_negative_int("total_iterations", total_iterations)
        if warmup > total_iterations:
            raise ValueError(f"warmup ({warmup}) exceeds total_iterations ({total_iterations})")
        if iteration > total_iterations:
            raise ValueError(f"iteration {iteration} is past total_iterations ({total_iterations})")

    if iteration < warmup:
        return base_lr * (iteration + 1) / warmup
    if schedule == "step":
        return base_lr * step_gamma ** (iteration // step_after)
    decay_length = total_iterations - warmup
    if decay_length == 0:
        # Only reachable at iteration == total_iterations == warmup: the end point of the decay.
        return 0.0
    progress = (iteration - warmup) / decay_length
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group of `optimizer`."""
    for group in optimizer.param_groups:
        group["lr"] = lr
