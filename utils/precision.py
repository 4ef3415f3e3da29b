"""Mixed precision: one place that turns `--amp` into an autocast context and a grad scaler."""
import contextlib
from typing import ContextManager

import torch

AMP_MODES = ("none", "bf16", "fp16")


def autocast(device: torch.device, amp: str) -> ContextManager:
    """Autocast context for `--amp` (`none` runs in fp32); works on CUDA and on the CPU."""
    if amp not in AMP_MODES:
        raise ValueError(f"--amp must be one of {AMP_MODES}, got {amp!r}")
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        # CPU fp16 autocast exists but is far slower than bf16 and loses range; refuse instead of
        # silently running something the user did not measure.
        raise ValueError("--amp fp16 needs CUDA; on the CPU use --amp bf16")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def use_tf32(enabled: bool) -> None:
    """Let CUDA matmuls and cuDNN convolutions run in TF32 (Ampere and later), or keep them in full fp32.

    The authors trained and evaluated with torch 1.8, where TF32 was on by default for both; torch
    >= 1.12 turned it off for matmuls. Without effect on the CPU.
    """
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def grad_scaler(device: torch.device, amp: str) -> "torch.amp.GradScaler":
    """A GradScaler that is active only for fp16 (bf16 has fp32's range and needs none)."""
    return torch.amp.GradScaler(device.type, enabled=(amp == "fp16"))
