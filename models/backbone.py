"""ResNet feature extractor (torchvision ResNet without its classifier) with optional block FeatureNorms."""
from __future__ import annotations

import copy
import os

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision import models as tv_models

from models.state_dicts import backbone_state_from_any, load_state_strict, read_state_file

NETWORKS = {"resnet18": 512, "resnet50": 2048}

_BUILDERS = {
    "resnet18": (tv_models.resnet18, tv_models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet50": (tv_models.resnet50, tv_models.ResNet50_Weights.IMAGENET1K_V1),
}
_STAGES = ("layer1", "layer2", "layer3", "layer4")


def block_feature_norm(block_output: Tensor) -> Tensor:
    """FeatureNorm of a block output [B, C, H, W]: per-channel L2 norm over space, then mean over channels."""
    # float32 so that a bf16 autocast forward does not lose the norm's precision.
    return torch.linalg.vector_norm(block_output.float(), ord=2, dim=(2, 3)).mean(dim=1)


class ResNetBackbone(nn.Module):
    """torchvision ResNet18/50 up to the global average pool; outputs flattened features [B, feat_dim]."""

    def __init__(self, network: str = "resnet18", weights: str | None = None) -> None:
        super().__init__()
        if network not in NETWORKS:
            raise ValueError(f"unknown network {network!r}; valid networks: {sorted(NETWORKS)}")
        builder, imagenet_weights = _BUILDERS[network]
        if weights is not None and weights != "imagenet" and not os.path.isfile(weights):
            raise FileNotFoundError(
                f"backbone weights must be None, 'imagenet' or an existing state-dict file; got {weights!r}")
        resnet = builder(weights=imagenet_weights if weights == "imagenet" else None)
        self.network = network
        self.feat_dim = NETWORKS[network]
        # Same attribute names as torchvision so state_dict keys match the authors' top-level copy.
        self.conv1 = resnet.conv1
        self.bn1 = resnet.bn1
        self.relu = resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        self.layer4 = resnet.layer4
        self.avgpool = resnet.avgpool
        if weights is not None and weights != "imagenet":
            self._load_weights_file(weights)

    def _load_weights_file(self, path: str) -> None:
        """Load a backbone state dict file in our layout or the authors' doubled layout (strict)."""
        state = backbone_state_from_any(read_state_file(path))
        load_state_strict(self, state, source=path)

    def block_names(self) -> list[str]:
        """Names of the residual blocks in forward order, e.g. ["layer1.0", "layer1.1", ...]."""
        return [f"{stage}.{i}" for stage in _STAGES for i in range(len(getattr(self, stage)))]

    def forward(self, x: Tensor, return_block_norms: bool = False,
                return_feature_map: bool = False) -> Tensor | tuple[Tensor, ...]:
        """Features [B, feat_dim]; with return_block_norms also the per-block FeatureNorms [B, n_blocks];
        with return_feature_map also the last block's output [B, feat_dim, h, w] (before the pool).

        With both, the tuple is (features, block norms, feature map); with neither, the features alone.
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        norms = []
        for stage in _STAGES:
            for block in getattr(self, stage):
                x = block(x)
                if return_block_norms:
                    norms.append(block_feature_norm(x))
        feats = torch.flatten(self.avgpool(x), 1)
        if not (return_block_norms or return_feature_map):
            return feats
        return (feats, *([torch.stack(norms, dim=1)] if return_block_norms else []),
                *([x] if return_feature_map else []))


def fold_batchnorm(backbone: ResNetBackbone) -> ResNetBackbone:
    """An eval-mode copy of `backbone` with every BatchNorm folded into the convolution before it.

    In eval mode a BatchNorm is a fixed per-channel affine map, so it can be merged into the
    preceding convolution's weights and bias: the features are the same function (float rounding
    apart, ~1e-7 relative) and the forward skips one full read and write of every activation. The
    given module is left untouched (training keeps using it).
    """
    if not isinstance(backbone, ResNetBackbone):
        raise TypeError(f"fold_batchnorm expects a ResNetBackbone, got {type(backbone).__name__}")
    folded = copy.deepcopy(backbone).eval()
    pairs = [(folded, "conv1", "bn1")]
    for stage in _STAGES:
        for block in getattr(folded, stage):
            # BasicBlock has conv1/bn1, conv2/bn2; Bottleneck also conv3/bn3.
            pairs += [(block, f"conv{i}", f"bn{i}") for i in (1, 2, 3) if hasattr(block, f"conv{i}")]
            if block.downsample is not None:
                pairs.append((block.downsample, "0", "1"))
    for parent, conv_name, bn_name in pairs:
        conv, norm = getattr(parent, conv_name), getattr(parent, bn_name)
        if not isinstance(conv, nn.Conv2d) or not isinstance(norm, nn.modules.batchnorm._BatchNorm):
            raise TypeError(f"cannot fold {type(norm).__name__} into {type(conv).__name__}; "
                            "expected a torchvision ResNet layout")
        if norm.running_mean is None or norm.running_var is None:
            raise ValueError("cannot fold a BatchNorm without running statistics")
        setattr(parent, conv_name, fuse_conv_bn_eval(conv, norm))
        setattr(parent, bn_name, nn.Identity())
    return folded
