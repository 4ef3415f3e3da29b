"""Evaluate as trained: the model- and data-defining settings of a run folder's `args.json`.

A checkpoint's tensors tell its backbone, objective (head size), depth and embedding width; they do
not tell the attention head count or the input size it was trained at. Those come from the run
folder's `args.json` (written by training), unless a flag or keyword given explicitly overrides
them. An explicit value that contradicts the checkpoint itself is refused.
"""
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Set

from torch import nn

from models.backbone_file import BackboneFile
from models.checkpoint import LoadedModel
from utils.run_args import RUN_ARGS_FILE, read_run_args

# Flags whose value `args.json` supplies (the checkpoint's tensors cannot tell them), with their
# smallest valid value.
RUN_DEFINED_FLAGS: Dict[str, int] = {"image_size": 32, "transf_n_heads": 1}
# The Python API's keyword for each of them (NoveltyDetector.from_folder).
API_KEYWORDS = {"image_size": "image_size", "transf_n_heads": "n_heads"}


class RunSettingsError(ValueError):
    """An invalid value in `args.json`, or a setting that contradicts the checkpoint.

    An `args.json` that cannot be read at all is a `utils.run_args.RunArgsError`.
    """


@dataclass
class RunSettings:
    """The settings an evaluation of a run folder uses, and where each came from."""

    image_size: int
    n_heads: int
    run_args: Optional[str]  # the args.json read, or None (e.g. the authors' released folder)
    run_values: Optional[Dict[str, Any]] = None  # its content
    overrides: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # flag -> {"run", "given"}
    messages: List[str] = field(default_factory=list)  # lines to print, in order


def _run_value(values: Mapping[str, Any], flag: str, path: str) -> Optional[int]:
    """`args.json`'s value of an integer flag (None when absent); an error naming the file if invalid."""
    if flag not in values:
        return None
    value = values[flag]
    if isinstance(value, bool) or not isinstance(value, int) or value < RUN_DEFINED_FLAGS[flag]:
        raise RunSettingsError(f"{path}: {flag} is {value!r}, expected an integer >= {RUN_DEFINED_FLAGS[flag]}")
    return value


def resolve_run_settings(folder: str, given: Mapping[str, int], explicit: Set[str],
                         keywords: bool = False) -> RunSettings:
    """image_size and transf_n_heads: explicit ones win (reported as overrides), then args.json, then `given`.

    Messages name command-line flags (`--image_size 64`), or API keywords (`image_size=64`) with `keywords`.
    """
    def setting(flag: str, value: Any) -> str:
        return f"{API_KEYWORDS[flag]}={value}" if keywords else f"--{flag} {value}"

    values = read_run_args(folder)
    path = os.path.join(folder, RUN_ARGS_FILE)
    resolved: Dict[str, int] = {}
    overrides: Dict[str, Dict[str, Any]] = {}
    messages: List[str] = []
    from_run: List[str] = []
    for flag in RUN_DEFINED_FLAGS:
        run_value = None if values is None else _run_value(values, flag, path)
        if flag in explicit or run_value is None:
            resolved[flag] = given[flag]
            if run_value is not None and run_value != given[flag]:
                overrides[flag] = {"run": run_value, "given": given[flag]}
                messages.append(f"{setting(flag, given[flag])} overrides the run's {run_value} ({path})")
            elif values is not None and run_value is None and flag not in explicit:
                messages.append(f"{path} does not record {flag}; using {setting(flag, given[flag])}")
        else:
            resolved[flag] = run_value
            from_run.append(f"{flag} {run_value}")
    if from_run:
        messages.insert(0, f"settings of the run from {path}: {', '.join(from_run)}")
    defaulted = [flag for flag in RUN_DEFINED_FLAGS if values is None and flag not in explicit]
    if defaulted:
        # E.g. the authors' release, or a checkpoint folder copied without its run's args.json.
        messages.append(f"no {RUN_ARGS_FILE} in {folder}: using "
                        f"{', '.join(setting(flag, given[flag]) for flag in defaulted)}")
    return RunSettings(image_size=resolved["image_size"], n_heads=resolved["transf_n_heads"],
                       run_args=path if values is not None else None, run_values=values,
                       overrides=overrides, messages=messages)


def model_facts(backbone: nn.Module, relational: Optional[nn.Module]) -> Dict[str, Any]:
    """Architecture read off the modules themselves: network, objective, depth, embed_dim, n_heads."""
    if relational is None:
        return {"network": backbone.network, "objective": "none", "depth": None, "embed_dim": None,
                "n_heads": None}
    return {"network": backbone.network, "objective": relational.objective, "depth": len(relational.blocks),
            "embed_dim": relational.proj.out_features, "n_heads": relational.blocks[0].attn.num_heads}


def backbone_record(backbone_file: Optional[BackboneFile]) -> Dict[str, Any]:
    """Result-record entries of a backbone read from its own file (--backbone_checkpoint); none otherwise.

    None is not recorded as a value, so that the records (and group hashes) of evaluations with the
    checkpoint's own backbone stay as they were.
    """
    if backbone_file is None:
        return {}
    return {"backbone_checkpoint": backbone_file.path, "backbone_sha256": backbone_file.sha256,
            "backbone_loaded": backbone_file.describe()}


def check_against_checkpoint(model: LoadedModel, given: Mapping[str, Any], explicit: Set[str],
                             run: RunSettings, warn: Callable[[str], None]) -> None:
    """Refuse explicit --network/--loss_function/--transf_depth values the checkpoint contradicts.

    `args.json` values that differ from the checkpoint (a run started from another folder with
    --pretrained records the flags, not what it loaded) are reported, and the checkpoint's are used.
    """
    facts = model_facts(model.backbone, model.relational)
    held = {"network": (facts["network"], f"a {facts['network']} backbone"),
            "loss_function": (facts["objective"],
                              f"a head for the {facts['objective']} objective ({model.relational.n_outputs} "
                              f"output{'s' if model.relational.n_outputs > 1 else ''})"),
            "transf_depth": (facts["depth"], f"{facts['depth']} relational blocks")}
    refused = [f"--{flag} {given[flag]} contradicts the checkpoint in {model.folder}, which holds {what}"
               for flag, (value, what) in held.items() if flag in explicit and given[flag] != value]
    if refused:
        raise RunSettingsError("; ".join(refused))
    values = run.run_values
    for flag, (value, what) in held.items():
        if values is not None and flag not in explicit and flag in values and values[flag] != value:
            warn(f"warning: {run.run_args} records --{flag} {values[flag]} but the checkpoint holds "
                 f"{what}; the checkpoint's is used")


def loaded_from(model: LoadedModel) -> str:
    """The directory every model file was read from (a run's checkpoint generation, or the folder itself)."""
    return os.path.abspath(model.source)


def loaded_line(model: LoadedModel) -> str:
    """'loaded iteration N from <directory>' (or that no iteration is recorded)."""
    return model.describe()
