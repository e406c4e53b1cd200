"""Stops a training whose gradients turned NaN or infinite, before it saves or checkpoints them.

Under bf16 and fp32 nothing skips such a step (only fp16's GradScaler does): AdamW writes NaN
into every weight and both moments, the EMA takes it in for good, and the run "succeeds" with a
model that segments nothing. The first bad step is remembered on the device, so the training
step keeps no host sync; the check runs where a sync happens anyway (a log row, a checkpoint,
the end), which is always before anything is written.
"""

from __future__ import annotations

import torch

from duplus.errors import TrainingDiverged


class DivergenceWatch:
    """Remembers the first optimizer step (1-based) whose gradient norm was not finite."""

    def __init__(self, device: torch.device, enabled: bool = True) -> None:
        # fp16 training leaves overflowing steps to its GradScaler, which skips them on purpose.
        self.enabled = enabled
        self._first = torch.zeros((), dtype=torch.long, device=device)

    def record(self, step: int, grad_norm: torch.Tensor) -> None:
        """Note ``step`` if ``grad_norm`` is not finite and no earlier step was (device ops only)."""
        if self.enabled:
            bad = ~torch.isfinite(grad_norm) & (self._first == 0)
            self._first = torch.where(bad, torch.full_like(self._first, int(step)), self._first)

    def check(self, what: str, checkpoints: object = None) -> None:
        """Raise ``TrainingDiverged`` naming the step (a host sync: call it where one happens anyway)."""
        first = int(self._first.item()) if self.enabled else 0
        if first:
            where = f"; the checkpoints in {checkpoints} were all written before it" if checkpoints else ""
            raise TrainingDiverged(
                f"{what}: the gradient norm of step {first} was NaN or infinite, so every weight updated after "
                f"it is too{where}. Lower the learning rate, or look for NaN or infinite values in the data of "
                "that step's cases"
            )
