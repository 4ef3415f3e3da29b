"""Checkpoint folders: strict load of the authors' files or of a run folder's last generation; atomic save.

A run folder of this project's training keeps each checkpoint as one generation folder,
`checkpoints/it<N>/`, holding the authors' three files and `checkpoint.pth`; `checkpoints/last`
(and `checkpoints/best`) are links to generations, switched by one atomic rename. Loaders resolve
`checkpoints/last` once and read every file from that one generation. A folder without it is read
flat: the authors' layout (their files as regular files), or an older run folder of this project.
"""
from __future__ import annotations

import contextlib
import numbers
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO

import torch
from torch import Tensor, nn

from models.backbone import NETWORKS, ResNetBackbone
from models.backbone_file import BackboneFile, load_backbone_file
from models.relational import RelationalTransformer
from models.state_dicts import (CheckpointError, _show, backbone_state_from_any, backbone_state_to_authors,
                                infer_network, load_state_strict, read_state_file)
from utils.atomic_files import StagedFiles, atomic_open

FEATURE_EXTRACTOR_FILE = "feature_extractor.pkl"
RELATIONAL_FILE = "cls_rel.pkl"
LAST_CHECKPOINT_FILE = "last_checkpoint.txt"
TRAIN_STATE_FILE = "checkpoint.pth"  # the full training state (training/state.py)
CHECKPOINTS_DIR = "checkpoints"
LAST_LINK = "last"
BEST_LINK = "best"
GENERATION_FILES = (FEATURE_EXTRACTOR_FILE, RELATIONAL_FILE, LAST_CHECKPOINT_FILE, TRAIN_STATE_FILE)
# it<iteration, 6+ digits>[.<n>]: a second generation of one iteration gets a suffix, never replaces the first.
GENERATION_NAME = re.compile(r"^it(\d{6,})(\.\d+)?$")

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


@dataclass
class LoadedModel:
    """Backbone and relational module restored from a checkpoint folder, with what was inferred."""

    backbone: ResNetBackbone
    relational: RelationalTransformer
    network: str
    objective: str
    iteration: int | None
    folder: str  # the folder asked for
    source: str  # the directory every file was read from: the resolved generation, or `folder` itself
    backbone_file: BackboneFile | None = None  # the backbone's own file, when it did not come from `source`

    def describe(self) -> str:
        """One line for logs: which iteration was loaded from where (and the backbone's file, if its own)."""
        iteration = "no iteration recorded" if self.iteration is None else f"iteration {self.iteration}"
        if self.backbone_file is None:
            return f"loaded {iteration} from {self.source}"
        return f"loaded {iteration} from {self.source} (relational module); {self.backbone_file.describe()}"


# ---------------------------------------------------------------- atomic writes

def atomic_torch_save(obj: object, path: str) -> None:
    """torch.save to a temp file in the same folder, then os.replace, so `path` is never half written."""
    with atomic_open(path, "wb") as out:
        torch.save(obj, out)


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


def _parse_iteration(text: str, path: str) -> int:
    """The iteration number held by last_checkpoint.txt's text."""
    try:
        return int(text.strip())
    except ValueError as exc:
        raise CheckpointError(f"{path} should hold an iteration number; got {text.strip()[:50]!r}") from exc


def resolve_checkpoint_dir(folder: str) -> str:
    """The directory holding `folder`'s checkpoint: its `checkpoints/last` generation, resolved once, or itself."""
    link = os.path.join(folder, CHECKPOINTS_DIR, LAST_LINK)
    if not os.path.lexists(link):
        return os.path.abspath(folder)
    target = os.path.realpath(link)
    if not os.path.isdir(target):
        raise CheckpointError(f"{link} points to {target}, which is not a folder")
    return target


def _open_for_reading(path: str) -> IO[bytes]:
    """open(path, 'rb'), with a missing file reported as a CheckpointError naming it."""
    try:
        return open(path, "rb")
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint file not found: {path}") from exc


def load_model_folder(folder: str, n_heads: int = 12, device: str | torch.device = "cpu",
                      backbone_file: str | None = None) -> LoadedModel:
    """Rebuild backbone and relational module from a checkpoint folder (strict); both returned in eval mode.

    A run folder's `checkpoints/last` is resolved once and every file is read from that generation.
    With `backbone_file` (see models.backbone_file) the backbone is read from it instead, and the
    folder needs no feature_extractor.pkl.
    """
    folder = str(folder)
    if not os.path.isdir(folder):
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    source = resolve_checkpoint_dir(folder)
    needed = (RELATIONAL_FILE,) if backbone_file is not None else (FEATURE_EXTRACTOR_FILE, RELATIONAL_FILE)
    absent = [n for n in needed if not os.path.isfile(os.path.join(source, n))]
    if absent:
        raise CheckpointError(f"checkpoint folder {source} lacks {absent}")
    backbone_path = os.path.join(source, FEATURE_EXTRACTOR_FILE) if backbone_file is None else str(backbone_file)
    relational_path = os.path.join(source, RELATIONAL_FILE)
    last_path = os.path.join(source, LAST_CHECKPOINT_FILE)

    # Every file is opened before any is read: a generation pruned meanwhile by a running training
    # stays readable through the open handles, so the three files always come from one generation.
    with contextlib.ExitStack() as stack:
        own_backbone = None if backbone_file is not None else stack.enter_context(_open_for_reading(backbone_path))
        relational_handle = stack.enter_context(_open_for_reading(relational_path))
        last_file = stack.enter_context(_open_for_reading(last_path)) if os.path.isfile(last_path) else None
        iteration = None if last_file is None else _parse_iteration(last_file.read().decode("utf-8", "replace"),
                                                                    last_path)
        backbone_state = (None if own_backbone is None else
                          backbone_state_from_any(read_state_file(backbone_path, device, handle=own_backbone)))
        relational_state = read_state_file(relational_path, device, handle=relational_handle)

    backbone_info = None
    if backbone_state is not None:
        network = infer_network(backbone_state)
        backbone = ResNetBackbone(network, weights=None)
        load_state_strict(backbone, backbone_state, source=backbone_path)
    else:
        backbone, backbone_info = load_backbone_file(backbone_file)
        network = backbone_info.network
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
        iteration=iteration,
        folder=folder,
        source=source,
        backbone_file=backbone_info,
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
    if os.path.lexists(os.path.join(folder, CHECKPOINTS_DIR, LAST_LINK)):
        # Its top-level names are links into the last generation: replacing them would mix generations.
        raise CheckpointError(f"{folder} is a training run folder (it has {CHECKPOINTS_DIR}/{LAST_LINK}); "
                              "save_model_folder writes plain authors' folders only")
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
