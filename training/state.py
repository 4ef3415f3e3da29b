"""Full training state (`checkpoint.pth`) beside the authors' two model files, written atomically."""
import argparse
import os
from typing import Any, Dict

import torch

from models.checkpoint import atomic_torch_save, save_model_folder
from models.resend import ReSeND
from utils.seeding import capture_rng_state

TRAIN_STATE_FILE = "checkpoint.pth"


def save_training_state(folder: str, model: ReSeND, optimizer: torch.optim.Optimizer,
                        scaler: "torch.amp.GradScaler", iteration: int, pairs_seen: int,
                        args: argparse.Namespace) -> None:
    """Write the authors' files (for their tools and our loader) and the full resumable state."""
    save_model_folder(folder, model.backbone, model.relational, iteration)
    state = {
        "backbone": model.backbone.state_dict(),
        "relational": model.relational.state_dict(),
        "optimizer": optimizer.state_dict(),  # includes the momentum buffers
        "scaler": scaler.state_dict(),
        # The lr is a pure function of the iteration (utils.optim.lr_at_iteration); its settings
        # are recorded so that a resume with different ones can be refused.
        "schedule": {"learning_rate": args.learning_rate, "warmup": args.warmup,
                     "step_after": args.step_after, "lr_schedule": args.lr_schedule,
                     "iterations": args.iterations},
        "iteration": iteration,
        "pairs_seen": pairs_seen,  # position in the pair stream, summed over processes
        "rng": capture_rng_state(),
        "args": {key: value for key, value in vars(args).items()
                 if isinstance(value, (int, float, str, bool, type(None)))},
    }
    atomic_torch_save(state, os.path.join(folder, TRAIN_STATE_FILE))


def load_training_state(folder: str, device: torch.device) -> Dict[str, Any]:
    """Read `checkpoint.pth`; it holds RNG states, so it is loaded with weights_only=False."""
    path = os.path.join(folder, TRAIN_STATE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {TRAIN_STATE_FILE} in {folder!r}")
    # Only files this project wrote are read here (the run folder of a resumed run).
    return torch.load(path, map_location=device, weights_only=False)
