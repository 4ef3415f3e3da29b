"""Checks of the installed libraries that would otherwise fail deep inside them."""
import importlib.metadata
from typing import Optional

import torch


def torchvision_problem() -> Optional[str]:
    """A one-line message when torchvision cannot be imported beside this torch (e.g. builds that differ).

    A torch/torchvision pair from different builds (a CPU torch beside a CUDA torchvision, or two
    releases) fails inside torchvision's import with `operator torchvision::nms does not exist`.
    """
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError) as error:
        try:
            installed = importlib.metadata.version("torchvision")
        except importlib.metadata.PackageNotFoundError:
            installed = "not installed"
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        return (f"torchvision ({installed}) cannot be imported with torch {torch.__version__}: {first_line}; "
                "reinstall both from one index as a matching pair, e.g. `pip install --force-reinstall torch "
                "torchvision` (or, CPU only: add `--index-url https://download.pytorch.org/whl/cpu`)")
    return None
