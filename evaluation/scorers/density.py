"""A normalizing-flow density head on the support features: normality = the flow's log-likelihood.

OODDetectionBench's `flow` evaluator scores a flow head trained with its backbone. Here the backbone
is frozen and a small RealNVP-style flow (Dinh et al. 2017) is trained on the support features alone:

1. the features are centred and their within-class scatter whitened (Ledoit-Wolf shrinkage, so that
   fewer images than dimensions work): every known class then has unit spread in every direction;
2. the `dims` (64) directions of largest spread (those that separate the classes) are kept, each
   scaled to unit spread; the rest of the space gets an isotropic Gaussian (probabilistic PCA);
3. affine coupling layers map those coordinates to a base density that is a mixture of Gaussians,
   one per known class (learnt means, one learnt diagonal spread, class frequencies as weights).

An untrained flow is the identity, so training (Adam on the joint log-likelihood log p(x, y)) starts
from the Gaussian classifier. 10 % of each class's support features are held out of every statistic
and of training, and the epoch with the best held-out likelihood is kept; when that is the start
(no epoch generalised better), the Gaussian start is refitted on all the support features. A scored
feature's normality is log p(x): the mixture marginal plus every log-determinant (flow, scaling,
whitening) plus the residual's Gaussian, a density on the whole feature space; its prediction is the
class of largest posterior. A short own implementation: no flow library is needed for affine
couplings (the inverse and the log-determinant are tested against autograd, and the density is
checked to integrate to one).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from evaluation.scorers.distance import ledoit_wolf_covariance
from evaluation.scorers.base import (
    FeatureBatch,
    Scorer,
    ScoreResult,
    ScoringInputs,
    check_non_negative_int,
    check_number,
    check_positive_int,
    check_scored,
    check_support,
    class_means,
    fitted,
    hyperparameter,
    register_scorer,
    require_fitted,
)
from utils.arg_types import non_negative_int, positive_float, positive_int

VALIDATION_SHARE = 0.1  # of the support features held out to choose the epoch (early stopping)
WITHIN_STD_FLOOR = 1e-2  # of a whitened coordinate (unit within-class spread): the base's spread stays positive
LOG_SCALE_LIMIT = 3.0  # every coupling's log-scale lies in (-3, 3): exp(+-3) per layer, never inf


class AffineCoupling(nn.Module):
    """y_b = x_b * exp(s(x_a)) + t(x_a), y_a = x_a, where x_a is the half of the dimensions a fixed random
    permutation puts first (`permutation[:dim // 2]`) and x_b the other half; y keeps x's order.

    s = LOG_SCALE_LIMIT * tanh(raw / LOG_SCALE_LIMIT) keeps the scale bounded; the last layer starts at
    zero, so an untrained coupling is the identity. log|det dy/dx| = sum(s).
    """

    def __init__(self, dim: int, permutation: Tensor, hidden: int) -> None:
        super().__init__()
        if dim < 2 or sorted(permutation.tolist()) != list(range(dim)):
            raise ValueError(f"a coupling needs dim >= 2 and a permutation of 0..dim-1, got dim {dim}")
        self.register_buffer("permutation", permutation.clone())
        self.register_buffer("inverse_permutation", torch.argsort(permutation))
        self.split = dim // 2
        self.net = nn.Sequential(nn.Linear(self.split, hidden), nn.ReLU(), nn.Linear(hidden, 2 * (dim - self.split)))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def _scale_shift(self, x_a: Tensor) -> tuple[Tensor, Tensor]:
        raw, shift = self.net(x_a).chunk(2, dim=1)
        return LOG_SCALE_LIMIT * torch.tanh(raw / LOG_SCALE_LIMIT), shift

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(y, log|det dy/dx|) for rows x [B, dim]."""
        x = x[:, self.permutation]
        x_a, x_b = x[:, :self.split], x[:, self.split:]
        log_scale, shift = self._scale_shift(x_a)
        y = torch.cat([x_a, x_b * torch.exp(log_scale) + shift], dim=1)
        return y[:, self.inverse_permutation], log_scale.sum(dim=1)

    def inverse(self, y: Tensor) -> Tensor:
        """x with forward(x)[0] == y."""
        y = y[:, self.permutation]
        y_a, y_b = y[:, :self.split], y[:, self.split:]
        log_scale, shift = self._scale_shift(y_a)
        return torch.cat([y_a, (y_b - shift) * torch.exp(-log_scale)], dim=1)[:, self.inverse_permutation]


class CouplingFlow(nn.Module):
    """A stack of affine couplings, each transforming its own random half of the dimensions."""

    def __init__(self, dim: int, layers: int, hidden: int, generator: torch.Generator) -> None:
        super().__init__()
        if dim < 2:
            raise ValueError(f"a coupling flow needs at least 2 feature dimensions, got {dim}")
        self.couplings = nn.ModuleList(AffineCoupling(dim, torch.randperm(dim, generator=generator), hidden)
                                       for _ in range(layers))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(f(x), log|det df/dx|)."""
        log_det = x.new_zeros(x.shape[0])
        for coupling in self.couplings:
            x, step = coupling(x)
            log_det = log_det + step
        return x, log_det

    def inverse(self, y: Tensor) -> Tensor:
        for coupling in reversed(self.couplings):
            y = coupling.inverse(y)
        return y


def held_out_mask(labels: Tensor, n_classes: int, share: float, generator: torch.Generator) -> Tensor:
    """[N] bool: floor(share * n_c) random samples of each class c (so every class keeps one to train on)."""
    mask = torch.zeros(len(labels), dtype=torch.bool)
    cpu_labels = labels.cpu()
    for c in range(n_classes):
        members = torch.nonzero(cpu_labels == c).flatten()
        n_held = int(len(members) * share)
        mask[members[torch.randperm(len(members), generator=generator)[:n_held]]] = True
    return mask


def _gaussian_log_density(z: Tensor, means: Tensor, log_std: Tensor) -> Tensor:
    """[B, C] log N(z; mean_c, diag(exp(log_std))^2): one shared diagonal covariance."""
    dim = z.shape[1]
    sq = ((z.unsqueeze(1) - means.unsqueeze(0)) / torch.exp(log_std)).pow(2).sum(dim=2)
    return -0.5 * sq - log_std.sum() - 0.5 * dim * math.log(2 * math.pi)


@register_scorer("flow", "log-likelihood of a small affine-coupling normalizing flow (class-conditional Gaussian "
                         "base) on the leading principal components of the support features, Gaussian residual")
@dataclass
class FlowScorer(Scorer):
    """Normality = log p(x) under a coupling flow trained on the support features (see the module docstring).

    With N support features the flow sees at most min(dims, D, the support's rank) coordinates; the
    projection keeps the flow small enough to train in about a second on a CPU.
    """

    fit_threads: ClassVar[int | None] = 1  # a small head: see Scorer.fit_threads

    layers: int = hyperparameter(4, "flow: affine coupling layers", flag="flow_layers", arg_type=positive_int)
    hidden: int = hyperparameter(64, "flow: hidden units of each coupling's network", flag="flow_hidden",
                                 arg_type=positive_int)
    dims: int = hyperparameter(64, "flow: leading directions of the within-class-whitened features the flow "
                                    "models (the rest: a Gaussian)",
                               flag="flow_dims", arg_type=positive_int)
    epochs: int = hyperparameter(20, "flow: passes over the support features", flag="flow_epochs",
                                 arg_type=non_negative_int)
    lr: float = hyperparameter(1e-3, "flow: Adam learning rate", flag="flow_lr", arg_type=positive_float)
    batch_size: int = hyperparameter(512, "flow: support features per step", arg_type=positive_int)
    seed: int = hyperparameter(0, "flow: seed of the initialisation and the batch order", arg_type=non_negative_int)
    flow: CouplingFlow | None = fitted()
    mean: Tensor | None = fitted()
    whitening: Tensor | None = fitted()  # [D, D] W with W' S_within W = I (S_within: shrunk within-class covariance)
    log_det_whitening: float | None = fitted()
    components: Tensor | None = fitted()  # [D, k] leading principal directions of the whitened support
    scales: Tensor | None = fitted()  # [k] the support's spread along them: the flow sees unit-spread inputs
    residual_var: float | None = fitted()
    base_means: Tensor | None = fitted()
    base_log_std: Tensor | None = fitted()
    log_priors: Tensor | None = fitted()
    losses: list[float] | None = fitted()  # training negative log-likelihood per coordinate, per epoch
    held_out: list[float] | None = fitted()  # the same on the held-out support features, from epoch 0 (the start)
    best_epoch: int | None = fitted()  # the epoch whose state is kept (0: the untrained start)

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "dims", "batch_size"):
            setattr(self, name, check_positive_int(getattr(self, name), f"flow {name}"))
        for name in ("epochs", "seed"):
            check_non_negative_int(getattr(self, name), f"flow {name}")
        check_number(self.lr, "flow lr", positive=True)

    def fit(self, inputs: ScoringInputs) -> None:
        """Whiten and project the support features, then train the flow and its base density."""
        n_classes = check_support(inputs.support)
        if inputs.support.feats.shape[1] < 2:
            raise ValueError(f"flow needs features of at least 2 dimensions, got {inputs.support.feats.shape[1]}")
        # Outside inference mode, on copies: the engine's features were computed under it.
        with torch.inference_mode(False), torch.enable_grad():
            self._fit(inputs.support.feats.detach().float().clone(), inputs.support.labels.detach().long().clone(),
                      n_classes)

    def _fit(self, feats: Tensor, labels: Tensor, n_classes: int) -> None:
        device = feats.device
        generator = torch.Generator().manual_seed(self.seed)
        # Early stopping needs support features nothing was fitted on: VALIDATION_SHARE of each class's
        # (rounded down: a class keeps at least one to train on) are held out from every statistic below.
        held = held_out_mask(labels, n_classes, VALIDATION_SHARE, generator).to(device)
        all_feats, all_labels = feats, labels
        feats, held_feats, labels, held_labels = feats[~held], feats[held], labels[~held], labels[held]
        u, k = self._project_support(feats, labels, n_classes)
        held_u = self._coordinates(held_feats)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            flow = CouplingFlow(k, self.layers, self.hidden, generator)
        flow = flow.to(device)
        start_means, start_log_std = self._gaussian_start(u, labels, n_classes)
        base_means, base_log_std = nn.Parameter(start_means.clone()), nn.Parameter(start_log_std.clone())
        optimiser = torch.optim.Adam([*flow.parameters(), base_means, base_log_std], lr=self.lr, foreach=True)

        def held_out_nll() -> float:
            with torch.no_grad():
                z, log_det = flow(held_u)
                joint = _gaussian_log_density(z, base_means, base_log_std).gather(1, held_labels[:, None]).squeeze(1)
                return float(-(joint + log_det).mean() / k)

        def snapshot() -> dict:
            return {"flow": copy.deepcopy(flow.state_dict()), "means": base_means.detach().clone(),
                    "log_std": base_log_std.detach().clone()}

        # The state with the best held-out log-likelihood is kept, the untrained start (the Gaussian
        # classifier) included; without held-out features (fewer than 1 / VALIDATION_SHARE per class)
        # the flow is not trained at all.
        n_held = held_u.shape[0]
        epochs = self.epochs if n_held > 0 else 0
        best, best_nll, self.best_epoch = snapshot(), held_out_nll() if n_held else math.inf, 0
        self.losses, self.held_out = [], [best_nll] if n_held else []
        batch = min(self.batch_size, u.shape[0])
        steps = math.ceil(u.shape[0] / batch)
        for epoch in range(1, epochs + 1):
            order = torch.randperm(u.shape[0], generator=generator).to(device)
            total = 0.0
            for step in range(steps):
                rows = order[step * batch:(step + 1) * batch]
                z, log_det = flow(u[rows])
                joint = _gaussian_log_density(z, base_means, base_log_std).gather(1, labels[rows, None]).squeeze(1)
                loss = -(joint + log_det).mean() / k
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                total += float(loss.detach()) * len(rows)
            self.losses.append(total / u.shape[0])
            self.held_out.append(held_out_nll())
            if self.held_out[-1] < best_nll:
                best, best_nll, self.best_epoch = snapshot(), self.held_out[-1], epoch
        flow.load_state_dict(best["flow"])
        self.flow = flow.eval()
        self.base_means = best["means"]
        self.base_log_std = best["log_std"]
        if self.best_epoch == 0 and n_held:
            # Training never beat the start: keep the start (an identity flow), fitted on every support feature.
            u, k = self._project_support(all_feats, all_labels, n_classes)
            self.base_means, self.base_log_std = self._gaussian_start(u, all_labels, n_classes)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                self.flow = CouplingFlow(k, self.layers, self.hidden,
                                         torch.Generator().manual_seed(self.seed)).to(device).eval()

    def _project_support(self, feats: Tensor, labels: Tensor, n_classes: int) -> tuple[Tensor, int]:
        """Fit the centring, whitening, kept directions, scales, residual variance and class priors on support
        features; return their flow coordinates [N, k] and k."""
        self.mean = feats.mean(dim=0)
        centred = feats - self.mean
        residuals = centred - class_means(centred, labels, n_classes)[labels]
        if not bool(residuals.abs().max() > 0):
            raise ValueError("flow: the support features do not vary within any class (e.g. one sample per class), "
                             "so no within-class spread can be estimated")
        # Whiten the within-class scatter (Ledoit-Wolf shrinkage keeps it invertible when N < D): every known
        # class then has unit spread in every direction, as the base Gaussians assume from the start.
        covariance, _ = ledoit_wolf_covariance(residuals.double())
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        eigenvalues = eigenvalues.clamp(min=max(float(eigenvalues.mean()) * 1e-6, 1e-300))
        self.whitening = (eigenvectors / torch.sqrt(eigenvalues)).float()
        self.log_det_whitening = float(-0.5 * torch.log(eigenvalues).sum())
        y = centred @ self.whitening
        # Then keep the directions of largest spread (between the classes): the flow models those k, an
        # isotropic Gaussian the rest. At least 2 coordinates for a coupling.
        spread, directions = torch.linalg.eigh((y.T @ y / y.shape[0]).double())
        spread, directions = spread.flip(0).clamp(min=0), directions.flip(1)
        # Never more than the directions the support actually spreads along (fewer than N when N < D): the
        # others belong to the residual.
        rank = int((spread > float(spread.max()) * 1e-5).sum())  # float32 rounding noise stays below
        k = max(2, min(self.dims, rank))  # rank <= y.shape[1]
        self.components = directions[:, :k].float()
        self.scales = torch.sqrt(spread[:k].clamp(min=WITHIN_STD_FLOOR ** 2)).float()
        # At least 1, the within-class variance the whitening sets: with fewer support features than
        # dimensions the support has no spread at all off its span, where scored features still vary.
        self.residual_var = max(float(spread[k:].mean()), 1.0) if k < y.shape[1] else None
        counts = torch.bincount(labels, minlength=n_classes).float()
        self.log_priors = torch.log(counts / counts.sum())
        return y @ self.components / self.scales, k

    def _coordinates(self, feats: Tensor) -> Tensor:
        """The flow's input coordinates [M, k] of raw features (float32)."""
        return (feats.float() - self.mean) @ self.whitening @ self.components / self.scales

    @staticmethod
    def _gaussian_start(u: Tensor, labels: Tensor, n_classes: int) -> tuple[Tensor, Tensor]:
        """The base's starting class means and log-spread: the Gaussian classifier of the coordinates (the
        pooled within-class spread per coordinate: diagonal, since the within-class scatter is whitened;
        small along the directions that separate the classes; floored at WITHIN_STD_FLOOR)."""
        means = class_means(u, labels, n_classes)
        within = (u - means[labels]).pow(2).mean(dim=0).sqrt().clamp(min=WITHIN_STD_FLOOR)
        return means, torch.log(within)

    @torch.no_grad()
    def log_likelihood(self, feats: Tensor) -> tuple[Tensor, Tensor]:
        """(log p(x) [M] in float64, the class of largest posterior [M]) of raw features."""
        require_fitted(self, "flow")
        check_scored(feats, self.mean.unsqueeze(0), "support features")
        y = ((feats.float() - self.mean) @ self.whitening).double()
        components = self.components.double()
        u = y @ components
        z, log_det = self.flow((u / self.scales.double()).float())
        joint = _gaussian_log_density(z.double(), self.base_means.double(), self.base_log_std.double()) \
            + self.log_priors.double()
        log_p = torch.logsumexp(joint, dim=1) + log_det.double() + self.log_det_whitening \
            - torch.log(self.scales.double()).sum()
        if self.residual_var is not None:
            residual = y - u @ components.T
            n_residual = y.shape[1] - components.shape[1]
            log_p = log_p - 0.5 * residual.pow(2).sum(dim=1) / self.residual_var \
                - 0.5 * n_residual * math.log(2 * math.pi * self.residual_var)
        return log_p, joint.argmax(dim=1)

    def score(self, scored: FeatureBatch) -> ScoreResult:
        """Normality = log p(x); pred = the class of largest posterior."""
        normality, pred = self.log_likelihood(scored.feats)
        return ScoreResult(normality=normality, pred=pred)
