"""Exponential moving average of a network's weights (the weights that are saved after training).

Updated with fused multi-tensor ops on the training device: no host synchronisation per step.
"""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """EMA of every floating-point state entry (parameters and buffers) of ``model``.

    The effective decay ramps up as ``min(decay, (1 + t) / (10 + t))`` so that the average is not
    dominated by the random initialisation in short runs (with 0.99 and 240 steps, a fixed decay
    would keep ~9 % of the initial weights).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def current_decay(self) -> float:
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights."""
        decay = self.current_decay()
        state = model.state_dict()
        averaged, current = [], []
        for key, shadow in self.shadow.items():
            value = state[key].detach()
            if shadow.is_floating_point():
                averaged.append(shadow)
                current.append(value.to(shadow.dtype))
            else:
                shadow.copy_(value)  # counters and integer buffers are copied, not averaged
        if averaged:
            torch._foreach_lerp_(averaged, current, 1.0 - decay)
        self.updates += 1

    def state_dict(self) -> dict[str, object]:
        return {"decay": self.decay, "updates": self.updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        shadow = state["shadow"]
        assert isinstance(shadow, dict)
        missing = sorted(set(self.shadow) - set(shadow))
        if missing:
            raise KeyError(f"EMA state lacks {missing[:5]}")
        for key, value in self.shadow.items():
            value.copy_(shadow[key])
        self.updates = int(state["updates"])  # type: ignore[arg-type]

    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model``."""
        model.load_state_dict(self.shadow)
