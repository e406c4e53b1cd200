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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from duplus.errors import CheckpointError, TrainingInterrupted
from duplus.progress import progress
from duplus.runtime import RssPeak
from duplus.train.batches import TextTable, batch_loss
from duplus.train.checkpoint import load_latest_checkpoint, rng_state, save_checkpoint, set_rng_state
from duplus.train.divergence import DivergenceWatch
from duplus.train.interrupt import StopFlag
from duplus.train.optim import GRAD_CLIP, build_optimizer, warmup_cosine
from duplus.train.sampling import PatchSampler, make_loader, workers_closed

log = logging.getLogger(__name__)


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes: the parameters that require grad, and every buffer.

    For a LoRA run that is the adapter (a few MB), not the frozen base the checkpoint need not repeat.
    """
    kept = {name for name, param in model.named_parameters() if param.requires_grad}
    kept |= {name for name, _ in model.named_buffers()}
    return {name: value for name, value in model.state_dict().items() if name in kept}


def _restore_trained_state(model: nn.Module, saved: dict[str, torch.Tensor], folder: Path) -> None:
    expected = trained_state(model)
    if set(saved) != set(expected) or any(saved[k].shape != expected[k].shape for k in expected):
        raise CheckpointError(f"{folder}: the checkpoint holds other trainable tensors than this model has "
                              "(a run with other adapter settings?); delete the folder to start over")
    model.load_state_dict(saved, strict=False)


@dataclass(frozen=True)
class FitStats:
    """What one training cost, summed (time) or maxed (memory) over the attempts of a resumed run.

    Checkpoint writes are left out of both: they are bookkeeping, and the full-model checkpoint of
    full fine-tuning would otherwise inflate its numbers against LoRA's few-MB one.
    """

    seconds: float
    rss_mb: float
    cuda_mb: float | None = None


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
) -> FitStats:
    """Train the parameters of ``model`` that require grad for ``steps`` steps.

    Warm-up over the first 10 % of steps, then cosine decay. Weight decay defaults to 0: it would
    pull LoRA factors (and fine-tuned weights) towards zero rather than towards the pretrained model.

    Args:
        checkpoints: folder for resumable checkpoints (None: none are written and SIGTERM kills).
            A checkpoint is written every ``checkpoint_every`` steps (0: never in between), after
            the last step and when SIGTERM arrives, which then raises ``TrainingInterrupted``. The
            caller keys the folder to the run: it must not hold another run's checkpoints.

    Returns:
        wall seconds and peak memory (resident, and CUDA allocated on a GPU) of the training.
    """
    device = table.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with RssPeak() as rss:
        optimizer = build_optimizer(model.parameters(), lr, weight_decay, device)
        scheduler = warmup_cosine(optimizer, max(1, steps // 10), steps)
        scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
        folder = Path(checkpoints) if checkpoints is not None else None
        before = FitStats(0.0, 0.0, None)
        resumed = load_latest_checkpoint(folder) if folder is not None else None
        if resumed is not None:
            state = resumed[1]
            _restore_trained_state(model, state["trained"], folder)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            before = FitStats(**state["stats"])
            log.info("%s: resuming at step %d of %d from %s", desc, resumed[0], steps, folder)
        started, bookkeeping = time.perf_counter(), 0.0

        def stats() -> FitStats:
            cuda = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
            return FitStats(before.seconds + time.perf_counter() - started - bookkeeping, max(before.rss_mb, rss.mb),
                            None if cuda is None else max(before.cuda_mb or 0.0, cuda))

        def checkpoint(done: int) -> None:
            nonlocal bookkeeping
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the recorded seconds include the queued GPU work
            at = time.perf_counter()
            with rss.paused():
                save_checkpoint(folder, done, {
                    "trained": trained_state(model), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(device),
                    "stats": asdict(stats()),
                })
            bookkeeping += time.perf_counter() - at

        _train(model, sampler, table, optimizer, scheduler, scaler, amp, steps, batch_size, seed, num_workers, desc,
               resumed, folder, checkpoint_every, checkpoint)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the wall time must include the queued GPU work
    return stats()


def keep_frozen_statistics(model: nn.Module) -> None:
    """Put the batch norms of the frozen base in eval mode, so their running statistics stay the base's.

    In train mode a batch norm updates its statistics whatever ``requires_grad`` says; an adapter
    does not save them, so the model scored after LoRA training could not be rebuilt from the
    adapter and its base (``norm: batch`` only; instance norms keep no statistics).
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats and \
                not any(p.requires_grad for p in module.parameters(recurse=False)):
            module.eval()


def _train(model: nn.Module, sampler: PatchSampler, table: TextTable, optimizer: torch.optim.Optimizer,
           scheduler: Any, scaler: torch.amp.GradScaler, amp: torch.dtype | None, steps: int, batch_size: int,
           seed: int, num_workers: int, desc: str, resumed: tuple[int, dict[str, Any]] | None, folder: Path | None,
           checkpoint_every: int, checkpoint: Callable[[int], None]) -> None:
    """The steps of ``fit`` from where a checkpoint left off (or the start) to ``steps``."""
    device = table.device
    start = resumed[0] if resumed is not None else 0
    params = [p for p in model.parameters() if p.requires_grad]
    loader = make_loader(sampler, seed, batch_size, 1, start, steps, num_workers=num_workers,
                         pin_memory=device.type == "cuda")
    watch = DivergenceWatch(device, enabled=not scaler.is_enabled())
    model.train()
    keep_frozen_statistics(model)
    # Without a checkpoint folder SIGTERM keeps its default: there is nothing to stop cleanly into.
    with StopFlag(signals=() if folder is None else (signal.SIGTERM,)) as stop, \
            workers_closed(iter(loader)) as batches, progress(total=steps, initial=start, desc=desc) as bar:
        if resumed is not None:
            # After the loader's iterator, which draws from the torch RNG when created: the state
            # is then the one the uninterrupted run had at this step (dropout on the LoRA path).
            set_rng_state(resumed[1]["rng"], device)
        for done in range(start + 1, steps + 1):
            loss = batch_loss(model, next(batches), table, amp)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            watch.record(done, torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP, foreach=True))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            bar.update(1)
            if folder is None:
                continue
            if (checkpoint_every > 0 and done % checkpoint_every == 0) or done == steps or stop.requested:
                watch.check(desc, folder)
                checkpoint(done)
            if stop.requested:
                # Also after the last step: the job's next phase (an evaluation) would not stop.
                raise TrainingInterrupted(f"{desc} stopped at step {done} of {steps}; checkpoint in {folder}, "
                                          "rerun to resume")
    watch.check(desc, folder)
    model.eval()
