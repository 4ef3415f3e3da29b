"""Reading, checking and converting state dicts: the backbone's two key layouts and strict loading.

The authors store every backbone tensor twice, under `model_resnet.<key>` and `<key>`; this
project's backbone has the top-level names. Everything here raises CheckpointError naming the file.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import IO

import torch
from torch import Tensor, nn

AUTHORS_PREFIX = "model_resnet."


class CheckpointError(ValueError):
    """A checkpoint file or folder is missing, unreadable or does not match the model."""


def read_state_file(path: str, map_location: str | torch.device = "cpu",
                    handle: IO[bytes] | None = None) -> dict[str, Tensor]:
    """Load a state dict (str -> Tensor) with weights_only=True; anything else -> CheckpointError naming path.

    `handle` is `path` already opened, for callers that must open several files before reading any.
    """
    return check_state_dict(load_torch_object(path, map_location, handle), path)


def load_torch_object(path: str, map_location: str | torch.device = "cpu",
                      handle: IO[bytes] | None = None) -> object:
    """What a torch.save file holds, loaded with weights_only=True; CheckpointError naming `path` (the
    torch error as its cause) when it cannot be read. `handle`: `path` already opened (or its bytes)."""
    if handle is None and not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        state = torch.load(path if handle is None else handle, map_location=map_location, weights_only=True)
    # torch.load reports corrupt input with many unrelated types (UnpicklingError, KeyError, EOFError, ...).
    except Exception as exc:
        raise CheckpointError(f"cannot read {path} as a torch state dict: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    return state


def check_state_dict(state: object, path: str) -> dict[str, Tensor]:
    """`state` as a dict if it maps names to tensors; otherwise a CheckpointError naming `path`."""
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
    module.load_state_dict(state)  # strict by default; the keys and shapes were checked above
