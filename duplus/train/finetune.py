"""A fixed-budget training loop for adaptation runs (LoRA or full fine-tuning of a pretrained model).

Same batches for every run with the same seed, so LoRA and full fine-tuning see identical data.
Given a checkpoint folder, a run killed, preempted or stopped by SIGTERM resumes where it stopped,
bit-identical on CPU to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from duplus.errors import CheckpointError, TrainingInterrupted
from duplus.progress import progress
from duplus.runtime import RssPeak
from duplus.train.batches import TextTable
from duplus.train.checkpoint import RandomState, TrainState, load_latest_checkpoint, save_checkpoint
from duplus.train.interrupt import StopFlag
from duplus.train.sampling import PatchSampler, make_loader, workers_closed
from duplus.train.step import TrainingStep

log = logging.getLogger(__name__)


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes: the parameters that require grad, and every buffer.

    For a LoRA run that is the adapter (a few MB), not the frozen base the checkpoint need not repeat.
    """
    kept = {name for name, param in model.named_parameters() if param.requires_grad}
    kept |= {name for name, _ in model.named_buffers()}
    return {name: value for name, value in model.state_dict().items() if name in kept}


class _TrainedTensors:
    """``trained_state`` as a checkpoint part; restoring refuses another model's (other adapter settings)."""

    def __init__(self, model: nn.Module, folder: Path | None) -> None:
        self.model, self.folder = model, folder

    def state_dict(self) -> dict[str, torch.Tensor]:
        return trained_state(self.model)

    def load_state_dict(self, saved: dict[str, torch.Tensor]) -> None:
        expected = trained_state(self.model)
        if set(saved) != set(expected) or any(saved[k].shape != expected[k].shape for k in expected):
            raise CheckpointError(f"{self.folder}: the checkpoint holds other trainable tensors than this model has "
                                  "(a run with other adapter settings?); delete the folder to start over")
        self.model.load_state_dict(saved, strict=False)


@dataclass(frozen=True)
class FitStats:
    """What one training cost, summed (time) or maxed (memory) over the attempts of a resumed run.

    Checkpoint writes are left out of both: they are bookkeeping, and the full-model checkpoint of
    full fine-tuning would otherwise inflate its numbers against LoRA's few-MB one.
    """

    seconds: float
    rss_mb: float
    cuda_mb: float | None = None


class _Cost:
    """The running ``FitStats`` of this attempt added to those an interrupted one saved (a checkpoint part)."""

    def __init__(self, rss: RssPeak, device: torch.device) -> None:
        self.rss, self.device = rss, device
        self.before = FitStats(0.0, 0.0, None)
        self.started, self.bookkeeping = time.perf_counter(), 0.0

    def stats(self) -> FitStats:
        device, before = self.device, self.before
        cuda = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        return FitStats(before.seconds + time.perf_counter() - self.started - self.bookkeeping,
                        max(before.rss_mb, self.rss.mb), None if cuda is None else max(before.cuda_mb or 0.0, cuda))

    def state_dict(self) -> dict[str, Any]:
        return asdict(self.stats())

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        self.before = FitStats(**saved)

    @contextlib.contextmanager
    def left_out(self) -> Iterator[None]:
        """A block (a checkpoint write) counted in neither the seconds nor the peak memory."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the recorded seconds include the queued GPU work
        at = time.perf_counter()
        with self.rss.paused():
            yield
        self.bookkeeping += time.perf_counter() - at


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
        step = TrainingStep(model, table, amp, lr=lr, weight_decay=weight_decay, warmup_steps=max(1, steps // 10),
                            steps=steps)
        folder = Path(checkpoints) if checkpoints is not None else None
        resumed = load_latest_checkpoint(folder) if folder is not None else None
        cost = _Cost(rss, device)
        # What an adaptation checkpoint holds, saved and restored from this one list (names as ever written).
        state = TrainState({
            "trained": _TrainedTensors(model, folder),
            "optimizer": step.optimizer,
            "scheduler": step.scheduler,
            "scaler": step.scaler,
            "rng": RandomState(device),
            "stats": cost,
        })
        loader = make_loader(sampler, seed, batch_size, 1, resumed[0] if resumed else 0, steps,
                             num_workers=num_workers, pin_memory=device.type == "cuda")
        _train(model, step, loader, steps, desc, resumed, state, cost, folder, checkpoint_every)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the wall time must include the queued GPU work
    return cost.stats()


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


def _train(model: nn.Module, step: TrainingStep, loader: Any, steps: int, desc: str,
           resumed: tuple[int, dict[str, Any]] | None, state: TrainState, cost: _Cost, folder: Path | None,
           checkpoint_every: int) -> None:
    """The steps of ``fit`` from where a checkpoint left off (or the start) to ``steps``."""
    start = resumed[0] if resumed is not None else 0
    model.train()
    keep_frozen_statistics(model)
    # Without a checkpoint folder SIGTERM keeps its default: there is nothing to stop cleanly into.
    with StopFlag(signals=() if folder is None else (signal.SIGTERM,)) as stop, \
            workers_closed(iter(loader)) as batches, progress(total=steps, initial=start, desc=desc) as bar:
        if resumed is not None:
            # After the loader's iterator, which draws from the torch RNG when created: the state
            # is then the one the uninterrupted run had at this step (dropout on the LoRA path).
            state.load_state_dict(resumed[1], folder)
            log.info("%s: resuming at step %d of %d from %s", desc, start, steps, folder)
        for done in range(start + 1, steps + 1):
            step(done, [next(batches)])
            bar.update(1)
            if folder is None:
                continue
            if (checkpoint_every > 0 and done % checkpoint_every == 0) or done == steps or stop.requested:
                step.watch.check(desc, folder)
                with cost.left_out():
                    save_checkpoint(folder, done, state.state_dict())
            if stop.requested:
                # Also after the last step: the job's next phase (an evaluation) would not stop.
                raise TrainingInterrupted(f"{desc} stopped at step {done} of {steps}; checkpoint in {folder}, "
                                          "rerun to resume")
    step.watch.check(desc, folder)
    model.eval()
