"""A backbone read from a file of its own, to pair with another checkpoint's relational module.

The relational module scores pairs of pooled backbone features, so it can sit on top of any ResNet
whose features have its input width: e.g. a ResNet-18 fine-tuned as a classifier on the known
classes of the target (the paper's plug-and-play use). Files accepted, read with weights_only:

- a torchvision or timm ResNet-18/50 `state_dict()` saved with torch.save, or a `.safetensors`
  file; a classifier's `fc.weight`/`fc.bias` (any number of classes) are dropped, as the relational
  module reads the features before the classifier;
- a checkpoint folder's `feature_extractor.pkl` (the authors' doubled layout, or this project's);
- a training script's checkpoint holding the state dict under "state_dict" or "model" (timm's and
  torchvision's reference scripts, Lightning), with keys prefixed "module." (DDP) or "_orig_mod."
  (torch.compile).

Anything else that differs from the architecture is a CheckpointError naming the file and the keys.
The file's SHA-256 is kept, so that results say which weights made them.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from models.backbone import ResNetBackbone
from models.state_dicts import (AUTHORS_PREFIX, CheckpointError, _show, backbone_state_from_any, check_state_dict,
                                infer_network, load_state_strict, load_torch_object)

WRAPPER_KEYS = ("state_dict", "model")  # entries a training script's checkpoint keeps the weights under
KEY_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile prefix every key of the model they wrap
CLASSIFIER_PREFIX = "fc."
SAFETENSORS_SUFFIX = ".safetensors"
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


@dataclass(frozen=True)
class BackboneFile:
    """Where a backbone was read from, and what of the file was left out."""

    path: str  # absolute
    sha256: str  # of the bytes that were loaded
    network: str
    dropped: tuple[str, ...]  # classifier keys left out
    unwrapped: tuple[str, ...]  # how the state dict was taken out of its container, e.g. "its 'model' entry"

    def describe(self) -> str:
        """'backbone from <path> (resnet18, sha256 <16 hex>, ...)': one line for logs and result records."""
        notes = [self.network, f"sha256 {self.sha256[:16]}", *self.unwrapped]
        if self.dropped:
            notes.append(f"classifier {', '.join(self.dropped)} dropped")
        return f"backbone from {self.path} ({', '.join(notes)})"


def _read_bytes(path: str) -> bytes:
    """The file's content; a missing file or a folder is a CheckpointError naming it."""
    if os.path.isdir(path):
        raise CheckpointError(f"backbone checkpoint {path} is a folder; give the state-dict file "
                              f"(e.g. {os.path.join(path, 'feature_extractor.pkl')})")
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError as exc:
        raise CheckpointError(f"backbone checkpoint not found: {path}") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read the backbone checkpoint {path}: {exc.strerror or exc}") from exc


def _deserialise(data: bytes, path: str) -> object:
    """The object a torch.save (weights_only) or safetensors file holds."""
    if path.endswith(SAFETENSORS_SUFFIX):
        from safetensors.torch import load as load_safetensors  # installed with timm
        try:
            return load_safetensors(data)
        except Exception as exc:  # safetensors reports a bad file with its own error types
            raise CheckpointError(f"cannot read {path} as a safetensors file: {type(exc).__name__}: {exc}") from exc
    # torchvision's and timm's training scripts store their argparse.Namespace next to the weights:
    # a plain record of values, allowed so those checkpoints load without unpickling arbitrary code.
    allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    try:
        with allow([argparse.Namespace]) if allow else contextlib.nullcontext():
            return load_torch_object(path, handle=io.BytesIO(data))
    except CheckpointError as error:
        # weights_only refuses any other pickled class; say so rather than show torch's long explanation.
        pickled = _UNSUPPORTED_GLOBAL.search(str(error.__cause__))
        if pickled:
            raise CheckpointError(f"cannot read {path} as a torch state dict: it holds a pickled {pickled.group(1)} "
                                  "object, which is not loaded (only tensors and plain containers are); "
                                  "save model.state_dict()") from error.__cause__
        raise


def _unwrap(content: object, path: str) -> tuple[dict[str, Tensor], list[str]]:
    """The state dict inside a training checkpoint's container, without a wrapper's key prefix."""
    notes = []
    if isinstance(content, Mapping) and not all(isinstance(v, Tensor) for v in content.values()):
        for key in WRAPPER_KEYS:
            if isinstance(content.get(key), Mapping):
                content, notes = content[key], [f"its {key!r} entry"]
                break
    state = check_state_dict(content, path)
    for prefix in KEY_PREFIXES:
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
            notes.append(f"'{prefix}' prefix removed")
    return state, notes


def _classifier_keys(state: Mapping[str, Tensor]) -> list[str]:
    """The ImageNet (or fine-tuned) classifier's keys, in either of the two backbone layouts."""
    return sorted(key for key in state
                  if key.startswith(CLASSIFIER_PREFIX) or key.startswith(AUTHORS_PREFIX + CLASSIFIER_PREFIX))


def load_backbone_file(path: str) -> tuple[ResNetBackbone, BackboneFile]:
    """A ResNet backbone (on the CPU, eval mode) from a state-dict file, strictly, and what was read."""
    path = str(path)
    data = _read_bytes(path)
    state, notes = _unwrap(_deserialise(data, path), path)
    if "cls_token" in state and "proj.weight" in state:
        raise CheckpointError(f"{path} holds a relational module (cls_token, proj.*, blocks.*), as cls_rel.pkl "
                              "does, not a backbone; give a ResNet state dict such as feature_extractor.pkl")
    dropped = _classifier_keys(state)
    backbone_state = backbone_state_from_any(state)
    if "layer1.0.conv1.weight" not in backbone_state:
        raise CheckpointError(f"{path} is not a ResNet-18/50 backbone state dict: no 'layer1.0.conv1.weight' key "
                              f"(first keys: {_show(list(state), limit=5)})")
    network = infer_network(backbone_state)
    backbone = ResNetBackbone(network, weights=None)
    load_state_strict(backbone, backbone_state, source=path)
    info = BackboneFile(path=os.path.abspath(path), sha256=hashlib.sha256(data).hexdigest(), network=network,
                        dropped=tuple(dropped), unwrapped=tuple(notes))
    return backbone.eval(), info
