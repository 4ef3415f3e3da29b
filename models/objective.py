"""The L2 and CE relation objectives of training: loss and binary prediction from relational logits.

Scoring at evaluation time does not go through here: the ReSeND scorers use the raw logits
(`evaluation.scorers.resend_similarity`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

OBJECTIVES = ("L2", "CE")


def _check_objective(objective: str) -> None:
    """Raise ValueError for an objective name other than "L2" or "CE"."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; valid objectives: {list(OBJECTIVES)}")


def _ce_logits(logits: Tensor) -> Tensor:
    """Return CE logits after checking they have shape [B, 2]."""
    if logits.dim() != 2 or logits.shape[1] != 2:
        raise ValueError(f"CE objective expects logits of shape [B, 2]; got {tuple(logits.shape)}")
    return logits


def l2_output(logits: Tensor, compression: float = 10., expansion: float = 2.) -> Tensor:
    """Squashed L2 output in (-e/2, e/2): expansion * sigmoid(compression * logit) - expansion / 2."""
    if logits.dim() == 2 and logits.shape[1] == 1:
        logits = logits[:, 0]
    elif logits.dim() != 1:
        raise ValueError(f"L2 objective expects logits of shape [B, 1] or [B]; got {tuple(logits.shape)}")
    return expansion * torch.sigmoid(compression * logits) - expansion / 2


def relation_loss(logits: Tensor, relation: Tensor, objective: str, compression: float = 10.,
                  expansion: float = 2.) -> Tensor:
    """Mean loss for relations (0 same class, 1 different): L2 = MSE to -e/2 / +e/2, CE = cross-entropy."""
    _check_objective(objective)
    if objective == "L2":
        output = l2_output(logits, compression, expansion)
        target = (relation.to(output.dtype) - 0.5) * expansion
        return F.mse_loss(output, target)
    return F.cross_entropy(_ce_logits(logits), relation.long())


def predict_different(logits: Tensor, objective: str, compression: float = 10.,
                      expansion: float = 2.) -> Tensor:
    """Boolean prediction "different class" per pair: L2 output > 0, or CE argmax == 1."""
    _check_objective(objective)
    if objective == "L2":
        return l2_output(logits, compression, expansion) > 0
    return _ce_logits(logits).argmax(dim=1) == 1
