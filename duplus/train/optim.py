"""Optimiser, learning-rate schedule and mixed-precision choice shared by pretraining and adaptation."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from duplus.errors import ConfigError

# nnU-Net's bound; keeps rare huge gradients (tiny structures, fresh classes) from derailing AdamW.
GRAD_CLIP = 12.0


def build_optimizer(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float,
                    device: torch.device) -> torch.optim.AdamW:
    """AdamW; the fused kernel on CUDA (one launch for all parameters)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ConfigError("no trainable parameter: nothing to optimise")
    fused = device.type == "cuda"
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  cycles: int = 1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from lr/warmup to lr, then ``cycles`` cosine decays to 0 ending at ``total_steps``.

    ``cycles=2`` is one warm restart halfway through the decay (back to the peak lr), as the
    paper's training code does; the cycles are equally long (SGDR with a period factor of 1).
    """
    if int(cycles) < 1:
        raise ConfigError(f"the learning-rate schedule needs at least one cosine cycle, got {cycles}")
    warmup = max(0, min(int(warmup_steps), int(total_steps) - 1))
    decay_steps = max(1, int(total_steps) - warmup)
    cycle_steps = decay_steps / int(cycles)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        into_decay = min(step - warmup, decay_steps)
        cycle = min(int(into_decay // cycle_steps), int(cycles) - 1)
        progress = min(1.0, (into_decay - cycle * cycle_steps) / cycle_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def resolve_amp(setting: str, device: torch.device, where: str = "pretrain.amp") -> torch.dtype | None:
    """Autocast dtype for ``auto|bf16|fp16|off``; None means full fp32.

    ``auto`` is bf16 on a GPU that supports it (fp16 otherwise) and fp32 on CPU, where autocast
    is slower than fp32 for 3-D convolutions.
    """
    setting = str(setting).lower()
    if setting == "off":
        return None
    if setting == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if setting == "bf16":
        return torch.bfloat16
    if setting == "fp16":
        if device.type != "cuda":
            raise ConfigError(f"{where}: fp16 autocast needs a CUDA device (got {device}); use bf16 or off")
        return torch.float16
    raise ConfigError(f"{where} must be auto, bf16, fp16 or off, got {setting!r}")


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """Autocast context for ``dtype`` (disabled when None)."""
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
