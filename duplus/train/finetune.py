"""A fixed-budget training loop for adaptation runs (LoRA or full fine-tuning of a pretrained model).

Same batches for every run with the same seed, so LoRA and full fine-tuning see identical data.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from duplus.progress import progress
from duplus.train.batches import TextTable, batch_loss
from duplus.train.optim import GRAD_CLIP, build_optimizer, warmup_cosine
from duplus.train.sampling import PatchSampler, make_loader, workers_closed


def fit(
    model: nn.Module,
    sampler: PatchSampler,
    table: TextTable,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    amp: torch.dtype | None,
    weight_decay: float = 0.0,
    num_workers: int = 0,
    desc: str = "adapt",
) -> float:
    """Train the parameters of ``model`` that require grad for ``steps`` steps; returns wall seconds.

    Warm-up over the first 10 % of steps, then cosine decay. Weight decay defaults to 0: it would
    pull LoRA factors (and fine-tuned weights) towards zero rather than towards the pretrained model.
    """
    device = table.device
    optimizer = build_optimizer(model.parameters(), lr, weight_decay, device)
    scheduler = warmup_cosine(optimizer, max(1, steps // 10), steps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    params = [p for p in model.parameters() if p.requires_grad]
    loader = make_loader(sampler, seed, batch_size, 1, 0, steps, num_workers=num_workers, pin_memory=device.type == "cuda")
    model.train()
    started = time.perf_counter()
    with workers_closed(iter(loader)) as batches:
        for batch in progress(batches, desc=desc, total=steps):
            loss = batch_loss(model, batch, table, amp)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP, foreach=True)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the wall time must include the queued GPU work
    model.eval()
    return time.perf_counter() - started
