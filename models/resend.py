"""The full ReSeND network: backbone features of both images, then the relational module."""
import torch
from torch import nn

from models.backbone import ResNetBackbone
from models.relational import RelationalTransformer


class ReSeND(nn.Module):
    """Backbone + relational module as one module, so DDP and the optimiser see a single model."""

    def __init__(self, backbone: ResNetBackbone, relational: RelationalTransformer) -> None:
        super().__init__()
        self.backbone = backbone
        self.relational = relational

    def forward(self, images_a: torch.Tensor, images_b: torch.Tensor) -> torch.Tensor:
        """Relation logits of each (images_a[k], images_b[k]) pair, token order [cls, a, b]."""
        # One backbone call on both halves: BatchNorm sees the whole pair batch, as in the
        # authors' training, and the convolution runs at twice the batch for better throughput.
        feats = self.backbone(torch.cat([images_a, images_b]))
        feats_a, feats_b = feats.split(images_a.shape[0])
        return self.relational(feats_a, feats_b)
