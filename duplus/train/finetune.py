"""A fixed-budget training loop for adaptation runs (LoRA or full fine-tuning of a pretrained model).

Same batches for every run with the same seed, so LoRA and full fine-tuning see identical data.
Given a checkpoint folder, a run killed, preempted or stopped by SIGTERM resumes where it stopped,
bit-identical on CPU to an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import torch
from torch import nn

from duplus.errors import CheckpointError
from duplus.progress import progress
from duplus.train.batches import TextTable, batch_loss
from duplus.train.checkpoint import load_latest_checkpoint, rng_state, save_checkpoint, set_rng_state
from duplus.train.interrupt import StopFlag, TrainingInterrupted
from duplus.train.optim import GRAD_CLIP, build_optimizer, warmup_cosine
from duplus.train.sampling import PatchSampler, make_loader, workers_closed

log = logging.getLogger(__name__)


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes: the parameters that require grad, and every buffer.

    For a LoRA run that is the adapter (a few MB), not the frozen base the checkpoint need not repeat.
    """
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    buffers = {name for name, _ in model.named_buffers()}
    return {name: value for name, value in model.state_dict().items() if name in trainable | buffers}


def _restore_trained_state(model: nn.Module, saved: dict[str, torch.Tensor], folder: Path) -> None:
    expected = trained_state(model)
    if set(saved) != set(expected) or any(saved[k].shape != expected[k].shape for k in expected):
        raise CheckpointError(f"{folder}: the checkpoint holds other trainable tensors than this model has "
                              "(a run with other adapter settings?); delete the folder to start over")
    model.load_state_dict(saved, strict=False)


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
    checkpoints: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
) -> float:
    """Train the parameters of ``model`` that require grad for ``steps`` steps; returns wall seconds.

    Warm-up over the first 10 % of steps, then cosine decay. Weight decay defaults to 0: it would
    pull LoRA factors (and fine-tuned weights) towards zero rather than towards the pretrained model.

    Args:
        checkpoints: folder for resumable checkpoints (None: none are written and SIGTERM kills).
            A checkpoint is written every ``checkpoint_every`` steps (0: never in between), after
            the last step and when SIGTERM arrives, which then raises ``TrainingInterrupted``. The
            caller keys the folder to the run: it must not hold another run's checkpoints.

    Returns:
        wall seconds of the training, summed over the attempts a resumed run took.
    """
    device = table.device
    optimizer = build_optimizer(model.parameters(), lr, weight_decay, device)
    scheduler = warmup_cosine(optimizer, max(1, steps // 10), steps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    params = [p for p in model.parameters() if p.requires_grad]
    folder = Path(checkpoints) if checkpoints is not None else None
    start, seconds_before, resumed = 0, 0.0, None
    if folder is not None:
        resumed = load_latest_checkpoint(folder)
    if resumed is not None:
        start, state = resumed
        _restore_trained_state(model, state["trained"], folder)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        seconds_before = float(state["seconds"])
        log.info("%s: resuming at step %d of %d from %s", desc, start, steps, folder)
    started = time.perf_counter()

    def checkpoint(done: int) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the recorded seconds include the queued GPU work
        save_checkpoint(folder, done, {
            "trained": trained_state(model), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(device),
            "seconds": seconds_before + time.perf_counter() - started,
        })

    loader = make_loader(sampler, seed, batch_size, 1, start, steps, num_workers=num_workers,
                         pin_memory=device.type == "cuda")
    model.train()
    # Without a checkpoint folder SIGTERM keeps its default: there is nothing to stop cleanly into.
    with StopFlag(signals=() if folder is None else (signal.SIGTERM,)) as stop, workers_closed(iter(loader)) as batches, \
            progress(total=steps, initial=start, desc=desc) as bar:
        if resumed is not None:
            # After the loader's iterator, which draws from the torch RNG when created: the state
            # is then the one the uninterrupted run had at this step (dropout on the LoRA path).
            set_rng_state(resumed[1]["rng"], device)
        for done in range(start + 1, steps + 1):
            loss = batch_loss(model, next(batches), table, amp)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP, foreach=True)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            bar.update(1)
            if folder is None:
                continue
            at_interval = checkpoint_every > 0 and done % checkpoint_every == 0
            if at_interval or done == steps or stop.requested:
                checkpoint(done)
            if stop.requested and done < steps:
                raise TrainingInterrupted(f"{desc} stopped at step {done} of {steps}; checkpoint in {folder}, "
                                          "rerun to resume")
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the wall time must include the queued GPU work
    model.eval()
    return seconds_before + time.perf_counter() - started
