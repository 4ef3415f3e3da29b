"""Seeding and capturing/restoring every random number generator a training run uses.

The captured state holds Python tuples and numpy arrays, so a training checkpoint that stores it
must be loaded with `torch.load(..., weights_only=False)` (only ever load checkpoints you trust).
"""
import random
from numbers import Integral

import numpy as np
import torch

RNG_KEYS = ("python", "numpy", "torch")


def seed_everything(seed: int) -> None:
    """Seed Python's `random`, numpy's global generator and torch (CPU and every CUDA device)."""
    if isinstance(seed, bool) or not isinstance(seed, Integral) or not 0 <= seed < 2 ** 32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    random.seed(int(seed))
    np.random.seed(int(seed))
    torch.manual_seed(int(seed))


def capture_rng_state() -> dict:
    """Snapshot of the Python, numpy, torch CPU and (if available) CUDA generator states."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> bool:
    """Restore a snapshot from `capture_rng_state`; returns whether the CUDA generators were restored.

    The CUDA generator states are restored only when the same number of devices is visible. The
    training draws no random numbers on the GPU (augmentations run on the CPU, seeded per pair), so a
    run saved on 16 GPUs resumes exactly on 8 or on the CPU.
    """
    missing = [key for key in RNG_KEYS if key not in state]
    if missing:
        raise ValueError(f"rng state lacks the keys {missing}; it has {sorted(state)}")
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    # Generator states must be CPU byte tensors; a checkpoint loaded with map_location="cuda" moves them.
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("cuda")
    if (torch.cuda.is_available() and cuda_states is not None
            and len(cuda_states) == torch.cuda.device_count()):
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
        return True
    return False
