"""One optimizer step, the same for universal pretraining, task-specific baselines and adaptation (LoRA, full fine-tuning).

Forward and backward under autocast (fp16 loss scaling), clipping, optimizer and schedule step, EMA, divergence watch.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from duplus.train.batches import TextTable, accumulated_loss
from duplus.train.divergence import DivergenceWatch
from duplus.train.ema import EMA
from duplus.train.optim import GRAD_CLIP, build_optimizer, warmup_cosine


class TrainingStep:
    """The optimiser, schedule, loss scaler and (optional) weight average of one training, and its step.

    Args:
        model: the network whose parameters that require grad are trained.
        table: prompt embeddings on the training device.
        amp: autocast dtype (None: fp32); fp16 scales the loss (``torch.amp.GradScaler``).
        lr, weight_decay: AdamW's.
        warmup_steps, steps, lr_cycles: the warm-up + cosine schedule (``duplus.train.optim.warmup_cosine``).
        ema_decay: keep an exponential moving average of the weights (None: none).
        forward: the module called for the loss, when it wraps ``model`` (DistributedDataParallel,
            ``torch.compile``); default ``model``.
        weight_total: maps a step's summed class weights to the loss divisor (data-parallel
            training sums them over ranks); default the step's own sum.
    """

    def __init__(self, model: nn.Module, table: TextTable, amp: torch.dtype | None, *, lr: float, weight_decay: float,
                 warmup_steps: int, steps: int, lr_cycles: int = 1, ema_decay: float | None = None,
                 forward: nn.Module | None = None,
                 weight_total: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        device = table.device
        self.model, self.table, self.amp = model, table, amp
        self.forward = model if forward is None else forward
        self.weight_total = weight_total
        self.optimizer = build_optimizer(model.parameters(), lr, weight_decay, device)
        self.scheduler = warmup_cosine(self.optimizer, warmup_steps, steps, lr_cycles)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
        self.ema = EMA(model, ema_decay) if ema_decay is not None else None
        # fp16's scaler skips overflowing steps on purpose; bf16 and fp32 steps must stay finite.
        self.watch = DivergenceWatch(device, enabled=not self.scaler.is_enabled())
        # Frozen parameters get no gradient: clipping over them or not gives the same norm.
        self.params = [p for p in model.parameters() if p.requires_grad]

    @property
    def lr(self) -> float:
        """The learning rate the next step uses."""
        return self.scheduler.get_last_lr()[0]

    def __call__(self, step: int, micro_batches: Sequence[dict[str, Any]]) -> torch.Tensor:
        """Optimizer step ``step`` (1-based) on ``micro_batches``, accumulated as one batch.

        Returns:
            the step's loss (0-dim, detached, on the device: no host sync).
        """
        loss = accumulated_loss(self.forward, micro_batches, self.table, self.amp,
                                lambda part: self.scaler.scale(part).backward(), self.weight_total)
        self.scaler.unscale_(self.optimizer)
        self.watch.record(step, torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP, foreach=True))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return loss
