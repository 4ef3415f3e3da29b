"""A run folder's `args.json`: the flag values training recorded, and their one reader.

Training reads it back to resume (and to keep earlier resumes' records); evaluation reads the
settings the checkpoint's tensors cannot tell. Both get the same answer and the same error.
"""
import json
import os
from typing import Any, Dict, Optional

RUN_ARGS_FILE = "args.json"


class RunArgsError(ValueError):
    """A run folder's `args.json` that exists but cannot be read as a JSON object of flags."""


def read_run_args(folder: str) -> Optional[Dict[str, Any]]:
    """The run folder's `args.json` as a dict, None when there is none; an error naming it if unreadable."""
    path = os.path.join(folder, RUN_ARGS_FILE)
    if not os.path.lexists(path):  # a dangling link is a broken args.json, not a missing one
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            values = json.load(handle)
    except (OSError, ValueError) as error:  # ValueError: bad JSON, and bytes that are not UTF-8
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise RunArgsError(f"cannot read the run's settings {path}: {reason}") from error
    if not isinstance(values, dict):
        raise RunArgsError(f"{path} should hold a JSON object of flags, got a {type(values).__name__}")
    return values
