"""A variational- and metric-based latent head (after Dinari & Freifeld, UAI 2022) on the support features.

The original trains an image encoder to a low-dimensional latent with (1) a metric loss whose
negative margin M_d grows during a warm-up (`margin_jump` per epoch from `margins_epoch` on, up to
`margin_max_distance`), (2) from `generation_epoch` on, a KL term (weight `kl_coeff`) pulling each
sample's posterior towards its class's Gaussian (the class means of the previous epoch, standard
deviation 0.1), on class-balanced batches (`batch_classes` classes x `sample_count` samples); a
sample's novelty is its latent's distance to the class Gaussians, weighted by the reconstruction
error of an auto-encoder (`ae_features`). Here the backbone is frozen: the encoder is a one-hidden-
layer network on the standardised support features, trained at fit time, and the auto-encoder is a
linear one on the same features, whose optimum is known in closed form (the projection on the
leading `ae_dims` principal components, at most half the feature size), so it costs one
eigendecomposition instead of training. This is the "fine-tune a head on the known classes" family
that ReSeND argues is unnecessary, measured beside it.

Metric loss: a double-margin contrastive loss with the margins of the original's modified triplet
loss (0.1 for positives, M_d for negatives): mean over same-class pairs of the batch of relu(d - 0.1)
plus mean over different-class pairs of relu(M_d - d), d the Euclidean distance of the sampled
latents. Normality = -(distance of the
latent mean to the nearest class mean) x (reconstruction error / its median over the support), or
the distance alone with `ae_features` off; pred = the nearest class.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

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
from utils.arg_types import boolean, non_negative_float, non_negative_int, positive_float, positive_int

POSITIVE_MARGIN = 0.1  # the original's triplet margin: same-class latents within this distance cost nothing
PRIOR_STD = 0.1  # standard deviation of each known class's Gaussian prior (as the original)
MARGIN_START = 0.15  # the original's initial negative margin
MIN_BATCHES_PER_EPOCH = 8
# A standardised feature whose support spread is below this share of the mean spread is scaled as if it
# had that spread (dead ReLU units, duplicated features): finite and well-posed.
STD_FLOOR = 1e-3


class LatentEncoder(nn.Module):
    """x -> (mu, log_var) of a diagonal Gaussian posterior in the latent space."""

    def __init__(self, dim: int, hidden: int, latent_dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
        self.mu = nn.Linear(hidden, latent_dim)
        self.log_var = nn.Linear(hidden, latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.body(x)
        return self.mu(h), self.log_var(h).clamp(-10.0, 10.0)


def metric_loss(z: Tensor, labels: Tensor, negative_margin: float) -> Tensor:
    """Mean relu(d - POSITIVE_MARGIN) over same-class pairs + mean relu(negative_margin - d) over the others."""
    squared = z.pow(2).sum(dim=1)
    # sqrt of a clamped square: differentiable at d = 0 (a sample and itself).
    dist = torch.sqrt((squared.unsqueeze(1) + squared.unsqueeze(0) - 2.0 * z @ z.T).clamp(min=1e-12))
    same = labels.unsqueeze(1) == labels.unsqueeze(0)
    # Pair weights rather than masked selections: the same means, a cheaper backward pass.
    positives = (same & ~torch.eye(len(labels), dtype=torch.bool, device=z.device)).to(z.dtype)
    negatives = (~same).to(z.dtype)
    loss = z.new_zeros(())
    if positives.sum() > 0:
        loss = loss + (torch.relu(dist - POSITIVE_MARGIN) * positives).sum() / positives.sum()
    if negatives.sum() > 0:
        loss = loss + (torch.relu(negative_margin - dist) * negatives).sum() / negatives.sum()
    return loss


def balanced_batches(labels: Tensor, n_classes: int, batch_classes: int, sample_count: int,
                     generator: torch.Generator) -> list[Tensor]:
    """One epoch of class-balanced batches: `batch_classes` random classes x `sample_count` random samples each
    (with replacement when a class has fewer), ceil(N / batch) batches so that an epoch sees ~N samples, and
    at least MIN_BATCHES_PER_EPOCH (a small support set still trains)."""
    members = [torch.nonzero(labels.cpu() == c).flatten() for c in range(n_classes)]
    per_batch = min(batch_classes, n_classes)
    n_batches = max(MIN_BATCHES_PER_EPOCH, math.ceil(len(labels) / (per_batch * sample_count)))
    batches = []
    for _ in range(n_batches):
        classes = torch.randperm(n_classes, generator=generator)[:per_batch]
        rows = []
        for c in classes.tolist():
            pool = members[c]
            if len(pool) >= sample_count:
                rows.append(pool[torch.randperm(len(pool), generator=generator)[:sample_count]])
            else:
                rows.append(pool[torch.randint(len(pool), (sample_count,), generator=generator)])
        batches.append(torch.cat(rows))
    return batches


@register_scorer("latent_vae", "distance to the nearest class mean in a 32-d latent trained with a class-Gaussian VAE "
                               "prior and a growing-margin metric loss, weighted by an auto-encoder's "
                               "reconstruction error (after Dinari & Freifeld, UAI 2022)")
@dataclass
class LatentVaeScorer(Scorer):
    """A VAE/metric latent head trained on the support features (see the module docstring)."""

    fit_threads: ClassVar[int | None] = 1  # a small head: see Scorer.fit_threads

    latent_dim: int = hyperparameter(32, "latent_vae: latent dimensions", flag="latent_dim", arg_type=positive_int)
    kl_coeff: float = hyperparameter(0.1, "latent_vae: weight of the KL term to the class Gaussians",
                                     flag="kl_coeff", arg_type=non_negative_float)
    generation_epoch: int = hyperparameter(5, "latent_vae: first epoch with the KL term", flag="generation_epoch",
                                           arg_type=non_negative_int)
    margin_jump: float = hyperparameter(1.0, "latent_vae: growth of the negative margin M_d per epoch",
                                        flag="margin_jump", arg_type=non_negative_float)
    margins_epoch: int = hyperparameter(0, "latent_vae: first epoch at which M_d grows", flag="margins_epoch",
                                        arg_type=non_negative_int)
    margin_max_distance: float = hyperparameter(8.0, "latent_vae: M_d stops growing once above this",
                                                flag="margin_max_distance", arg_type=positive_float)
    batch_classes: int = hyperparameter(10, "latent_vae: classes per batch (B_c; all when fewer)",
                                        flag="batch_classes", arg_type=positive_int)
    sample_count: int = hyperparameter(32, "latent_vae: samples per class per batch (B_s)", flag="sample_count",
                                       arg_type=positive_int)
    ae_features: bool = hyperparameter(False, "latent_vae: weight the latent distance by the (linear) auto-encoder's "
                                              "reconstruction error (on/off)", flag="ae_features", arg_type=boolean)
    epochs: int = hyperparameter(30, "latent_vae: passes over the support features", flag="vae_epochs",
                                 arg_type=non_negative_int)
    lr: float = hyperparameter(3e-3, "latent_vae: Adam learning rate", flag="vae_lr", arg_type=positive_float)
    hidden: int = hyperparameter(128, "latent_vae: hidden units of the encoder", arg_type=positive_int)
    ae_dims: int = hyperparameter(64, "latent_vae: bottleneck of the (linear) auto-encoder", arg_type=positive_int)
    seed: int = hyperparameter(0, "latent_vae: seed of the initialisation and the batches", arg_type=non_negative_int)
    encoder: LatentEncoder | None = fitted()
    ae_components: Tensor | None = fitted()  # [D, ae_dims]: the linear auto-encoder's optimal subspace
    mean: Tensor | None = fitted()
    std: Tensor | None = fitted()
    latent_means: Tensor | None = fitted()
    recon_scale: float | None = fitted()
    final_margin: float | None = fitted()

    def __post_init__(self) -> None:
        for name in ("latent_dim", "batch_classes", "sample_count", "hidden", "ae_dims"):
            setattr(self, name, check_positive_int(getattr(self, name), f"latent_vae {name}"))
        for name in ("generation_epoch", "margins_epoch", "epochs", "seed"):
            check_non_negative_int(getattr(self, name), f"latent_vae {name}")
        for name, positive in (("kl_coeff", False), ("margin_jump", False), ("margin_max_distance", True),
                               ("lr", True)):
            check_number(getattr(self, name), f"latent_vae {name}", positive)
        if not isinstance(self.ae_features, bool):
            raise ValueError(f"latent_vae ae_features must be True or False, got {self.ae_features!r}")

    def fit(self, inputs: ScoringInputs) -> None:
        """Standardise the support features, train the encoder (and the auto-encoder), keep the class means."""
        n_classes = check_support(inputs.support)
        # Outside inference mode, on copies: the engine's features were computed under it.
        with torch.inference_mode(False), torch.enable_grad():
            self._fit(inputs.support.feats.detach().float().clone(), inputs.support.labels.detach().long().clone(),
                      n_classes)

    def _fit(self, feats: Tensor, labels: Tensor, n_classes: int) -> None:
        device = feats.device
        self.mean = feats.mean(dim=0)
        spread = feats.std(dim=0, unbiased=False)
        self.std = torch.clamp(spread, min=max(STD_FLOOR * float(spread.mean()), 1e-6))
        x = (feats - self.mean) / self.std
        generator = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            encoder = LatentEncoder(x.shape[1], self.hidden, self.latent_dim).to(device)
        optimiser = torch.optim.Adam(encoder.parameters(), lr=self.lr, foreach=True)
        margin = MARGIN_START
        prior_means = torch.zeros(n_classes, self.latent_dim, device=device)
        for epoch in range(self.epochs):
            # The original's UpdateMargin callback: grow M_d at the start of every epoch from margins_epoch on.
            if epoch >= self.margins_epoch and margin <= self.margin_max_distance:
                margin += self.margin_jump
            sums = torch.zeros(n_classes, self.latent_dim, device=device)
            counts = torch.zeros(n_classes, device=device)
            for rows in balanced_batches(labels, n_classes, self.batch_classes, self.sample_count, generator):
                rows = rows.to(device)
                batch, batch_labels = x[rows], labels[rows]
                mu, log_var = encoder(batch)
                noise = torch.randn(mu.shape, generator=generator).to(device)
                z = mu + torch.exp(0.5 * log_var) * noise
                loss = metric_loss(z, batch_labels, margin)
                if epoch >= self.generation_epoch and self.kl_coeff > 0 and epoch > 0:
                    loss = loss + self.kl_coeff * self._kl_to_classes(mu, log_var, z, batch_labels, prior_means)
                if loss.requires_grad:  # a one-sample batch without the KL term has no pair, so nothing to learn
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    optimiser.step()
                sums.index_add_(0, batch_labels, z.detach())
                counts += torch.bincount(batch_labels, minlength=n_classes).float()
            # The class Gaussians' means for the next epoch's KL term: this epoch's latents per class.
            seen = counts > 0
            prior_means[seen] = sums[seen] / counts[seen, None]
        self.encoder = encoder.eval()
        self.final_margin = margin
        with torch.no_grad():
            self.latent_means = class_means(encoder(x)[0], labels, n_classes)
            if self.ae_features:
                # The linear auto-encoder with an ae_dims bottleneck that minimises the support's squared
                # reconstruction error projects on the leading principal components (Eckart-Young).
                eigenvectors = torch.linalg.eigh((x.T @ x).double())[1]
                # A bottleneck as wide as the features would reconstruct everything exactly: at most D / 2.
                self.ae_components = eigenvectors[:, -max(1, min(self.ae_dims, x.shape[1] // 2)):].float()
                errors = self._reconstruction_error(x)
                # A support set the auto-encoder reproduces exactly keeps the scale finite.
                self.recon_scale = max(float(errors.median()), 1e-12)

    @staticmethod
    def _kl_to_classes(mu: Tensor, log_var: Tensor, z: Tensor, labels: Tensor, prior_means: Tensor) -> Tensor:
        """Single-sample KL estimate log q(z|x) - log N(z; mean_y, PRIOR_STD^2), averaged per class, then over
        the classes of the batch (the original's estimator)."""
        log_q = torch.distributions.Normal(mu, torch.exp(0.5 * log_var)).log_prob(z)
        log_p = torch.distributions.Normal(prior_means[labels], PRIOR_STD).log_prob(z)
        per_sample = (log_q - log_p).mean(dim=1)
        classes = torch.unique(labels)
        return torch.stack([per_sample[labels == c].mean() for c in classes]).mean()

    def _reconstruction_error(self, x: Tensor) -> Tensor:
        """Mean squared error of the linear auto-encoder on standardised features."""
        return (x - (x @ self.ae_components) @ self.ae_components.T).pow(2).mean(dim=1)

    @torch.no_grad()
    def score(self, scored: FeatureBatch) -> ScoreResult:
        """Normality = -(nearest class-mean distance of the latent mean) [x relative reconstruction error]."""
        require_fitted(self, "encoder")
        check_scored(scored.feats, self.mean.unsqueeze(0), "support features")
        x = (scored.feats.float() - self.mean) / self.std
        mu = self.encoder(x)[0].double()
        distance, pred = torch.cdist(mu, self.latent_means.double()).min(dim=1)
        novelty = distance
        extra = {}
        if self.ae_features:
            relative = self._reconstruction_error(x).double() / self.recon_scale
            novelty = distance * relative
            extra["latent_distance"] = -distance
        return ScoreResult(normality=-novelty, pred=pred, extra=extra)
