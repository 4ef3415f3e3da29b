"""The authors' checkpoint folder (feature_extractor.pkl, cls_rel.pkl, last_checkpoint.txt): strict load, atomic save."""
from __future__ import annotations

import numbers
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.backbone import NETWORKS, ResNetBackbone
from models.relational import RelationalTransformer
from utils.atomic_files import StagedFiles, atomic_open

FEATURE_EXTRACTOR_FILE = "feature_extractor.pkl"
RELATIONAL_FILE = "cls_rel.pkl"
LAST_CHECKPOINT_FILE = "last_checkpoint.txt"

AUTHORS_PREFIX = "model_resnet."
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


class CheckpointError(ValueError):
    """A checkpoint file or folder is missing, unreadable or does not match the model."""


@dataclass
class LoadedModel:
    """Backbone and relational module restored from a checkpoint folder, with what was inferred."""

    backbone: ResNetBackbone
    relational: RelationalTransformer
    network: str
    objective: str
    iteration: int | None
    folder: str


# ---------------------------------------------------------------- atomic writes

def atomic_torch_save(obj: object, path: str) -> None:
    """torch.save to a temp file in the same folder, then os.replace, so `path` is never half written."""
    with atomic_open(path, "wb") as out:
        torch.save(obj, out)


# ---------------------------------------------------------------- state dicts

def read_state_file(path: str, map_location: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Load a state dict (str -> Tensor) with weights_only=True; anything else -> CheckpointError naming path."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    # torch.load reports corrupt input with many unrelated types (UnpicklingError, KeyError, EOFError, ...).
    except Exception as exc:
        raise CheckpointError(f"cannot read {path} as a torch state dict: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict")
    bad = [repr(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{path} is not a state dict: non-tensor entries {_show(bad)}")
    return dict(state)


def _show(keys: list[str], limit: int = 20) -> str:
    """Readable, bounded list of keys for error messages."""
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return "[" + ", ".join(keys[:limit]) + "]" + more


def _without_fc(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop the ImageNet classifier, which the backbone does not have."""
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def backbone_state_from_any(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Backbone state in our layout (top-level keys, no fc) from our layout or the authors' (doubled) one."""
    prefixed = _without_fc({k[len(AUTHORS_PREFIX):]: v for k, v in state.items() if k.startswith(AUTHORS_PREFIX)})
    top = _without_fc({k: v for k, v in state.items() if not k.startswith(AUTHORS_PREFIX)})
    if not prefixed:
        return top
    if not top:
        return prefixed
    only_prefixed = [AUTHORS_PREFIX + k for k in prefixed.keys() - top.keys()]
    only_top = list(top.keys() - prefixed.keys())
    differing = [k for k in prefixed.keys() & top.keys() if not torch.equal(prefixed[k], top[k])]
    if only_prefixed or only_top or differing:
        raise CheckpointError(
            f"the two backbone copies ('{AUTHORS_PREFIX}*' and top level) differ: "
            f"only under the prefix {_show(only_prefixed)}, only at top level {_show(only_top)}, "
            f"different values {_show(differing)}")
    return top


def backbone_state_to_authors(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The authors' layout: every backbone tensor under 'model_resnet.<k>' and '<k>', no fc."""
    plain = _without_fc(state)
    # The same tensor objects under both names: torch.save stores each storage once.
    out = {AUTHORS_PREFIX + k: v for k, v in plain.items()}
    out.update(plain)
    return out


def infer_network(backbone_state: Mapping[str, Tensor]) -> str:
    """ "resnet50" if the (top-level) state has bottleneck blocks, "resnet18" if basic blocks."""
    if "layer1.0.conv3.weight" in backbone_state:
        return "resnet50"
    if "layer1.0.conv1.weight" in backbone_state:
        return "resnet18"
    raise CheckpointError(
        "cannot infer the backbone network: no 'layer1.0.conv1.weight' key in the backbone state "
        f"(first keys: {_show(list(backbone_state), limit=5)})")


def load_state_strict(module: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """load_state_dict that reports every missing, unexpected and misshaped key as one CheckpointError."""
    expected = module.state_dict()
    missing = list(expected.keys() - state.keys())
    unexpected = list(state.keys() - expected.keys())
    misshaped = [f"{k}: {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                 for k in expected.keys() & state.keys() if state[k].shape != expected[k].shape]
    if missing or unexpected or misshaped:
        problems = []
        if missing:
            problems.append(f"missing keys {_show(missing)}")
        if unexpected:
            problems.append(f"unexpected keys {_show(unexpected)}")
        if misshaped:
            problems.append(f"misshaped tensors {_show(misshaped)}")
        raise CheckpointError(f"{source} does not match {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(state, strict=True)


# ---------------------------------------------------------------- folders

def _relational_shape(state: Mapping[str, Tensor], source: str) -> tuple[int, int, int, int]:
    """(feat_dim, embed_dim, depth, n_outputs) read off the relational state's tensors."""
    required = ("proj.weight", "head.weight")
    absent = [k for k in required if k not in state]
    if absent:
        raise CheckpointError(f"{source}: missing keys {_show(absent)}")
    for key in required:
        if state[key].dim() != 2:
            raise CheckpointError(f"{source}: misshaped tensors [{key}: {tuple(state[key].shape)}, expected 2-D]")
    embed_dim, feat_dim = state["proj.weight"].shape
    n_outputs = state["head.weight"].shape[0]
    if n_outputs not in (1, 2):
        raise CheckpointError(f"{source}: head.weight has {n_outputs} rows; expected 1 (L2) or 2 (CE)")
    depth = len({int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k))})
    if depth == 0:
        raise CheckpointError(f"{source}: no 'blocks.<i>.*' tensors")
    return feat_dim, embed_dim, depth, n_outputs


def _read_iteration(path: str) -> int | None:
    """Iteration number stored in last_checkpoint.txt, or None when the file does not exist."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        text = f.read().strip()
    try:
        return int(text)
    except ValueError as exc:
        raise CheckpointError(f"{path} should hold an iteration number; got {text[:50]!r}") from exc


def load_model_folder(folder: str, n_heads: int = 12, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild backbone and relational module from a checkpoint folder (strict); both returned in eval mode."""
    folder = str(folder)
    if not os.path.isdir(folder):
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    absent = [n for n in (FEATURE_EXTRACTOR_FILE, RELATIONAL_FILE) if not os.path.isfile(os.path.join(folder, n))]
    if absent:
        raise CheckpointError(f"checkpoint folder {folder} lacks {absent}")

    backbone_path = os.path.join(folder, FEATURE_EXTRACTOR_FILE)
    backbone_state = backbone_state_from_any(read_state_file(backbone_path, map_location=device))
    network = infer_network(backbone_state)
    backbone = ResNetBackbone(network, weights=None)
    load_state_strict(backbone, backbone_state, source=backbone_path)

    relational_path = os.path.join(folder, RELATIONAL_FILE)
    relational_state = read_state_file(relational_path, map_location=device)
    feat_dim, embed_dim, depth, n_outputs = _relational_shape(relational_state, relational_path)
    if feat_dim != NETWORKS[network]:
        raise CheckpointError(
            f"{relational_path}: proj.weight expects {feat_dim}-d features but {backbone_path} "
            f"is a {network} with {NETWORKS[network]}-d features")
    relational = RelationalTransformer(feat_dim=feat_dim, n_outputs=n_outputs, embed_dim=embed_dim,
                                       depth=depth, n_heads=n_heads)
    load_state_strict(relational, relational_state, source=relational_path)

    return LoadedModel(
        backbone=backbone.to(device).eval(),
        relational=relational.to(device).eval(),
        network=network,
        objective=relational.objective,
        iteration=_read_iteration(os.path.join(folder, LAST_CHECKPOINT_FILE)),
        folder=folder,
    )


def _cpu_state(module: nn.Module) -> dict[str, Tensor]:
    """Detached CPU copy of a module's state dict, so files load without the training device."""
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def save_model_folder(folder: str, backbone: ResNetBackbone, relational: RelationalTransformer,
                      iteration: int | None) -> None:
    """Write the checkpoint folder in the authors' format; every file replaced atomically.

    With iteration=None an older last_checkpoint.txt is removed so it cannot describe other weights.
    """
    # Wrapped modules (DDP, torch.compile) would prefix every key and break the authors' loaders.
    if not isinstance(backbone, ResNetBackbone):
        raise TypeError(f"backbone must be a ResNetBackbone (unwrap DDP/compile); got {type(backbone).__name__}")
    if not isinstance(relational, RelationalTransformer):
        raise TypeError(f"relational must be a RelationalTransformer (unwrap DDP/compile); "
                        f"got {type(relational).__name__}")
    if iteration is not None and (not isinstance(iteration, numbers.Integral) or isinstance(iteration, bool)
                                  or iteration < 0):
        raise ValueError(f"iteration must be a non-negative int or None; got {iteration!r}")
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    last_path = os.path.join(folder, LAST_CHECKPOINT_FILE)
    # Every file is written before any is replaced, so a failure while serialising changes nothing.
    with StagedFiles() as files:
        with files.open(os.path.join(folder, FEATURE_EXTRACTOR_FILE), "wb") as out:
            torch.save(backbone_state_to_authors(_cpu_state(backbone)), out)
        with files.open(os.path.join(folder, RELATIONAL_FILE), "wb") as out:
            torch.save(_cpu_state(relational), out)
        if iteration is not None:
            with files.open(last_path, "w") as out:
                out.write(f"{int(iteration)}\n")
    if iteration is None and os.path.exists(last_path):
        os.remove(last_path)
