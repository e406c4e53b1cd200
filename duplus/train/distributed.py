"""Data-parallel training over several processes (one per GPU), launched with torchrun.

A rule given N > 1 processes re-launches its training function under ``torchrun --standalone``;
each rank trains on its slice of every optimizer step's samples, gradients are averaged by
DistributedDataParallel, and only rank 0 writes checkpoints, logs and the model. ``pretrain.batch_size``
stays the global batch, so a run gives the same numbers with 1 or N processes (up to float
reduction order) and may resume with a different process count.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from duplus.errors import ConfigError, DuplusError, TrainingInterrupted
from duplus.settings import Settings

log = logging.getLogger(__name__)

INTERRUPTED = "interrupted-rank"  # marker a rank leaves beside its arguments when it stopped on request

# Entry points a worker may run, by name: the arguments travel as JSON, never as pickles.
ENTRY_POINTS = {
    "pretrain": "duplus.train.pretrain:run_pretrain",
    "baseline": "duplus.train.baseline:run_baseline",
}


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def from_environment() -> Ranks:
    """The ranks torchrun (or ``srun`` with one task per GPU) put in the environment."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    return Ranks(rank=int(env["RANK"]), world=world, local_rank=int(env.get("LOCAL_RANK", env["RANK"])))


# A gloo group beside NCCL for small host-side decisions (stop now?): agreeing on them costs no
# GPU synchronisation. None while not distributed, or when the main group is gloo already.
_host_group: Any = None


def start(ranks: Ranks, device: torch.device) -> torch.device:
    """Join the process group (NCCL on GPUs, gloo on CPUs); returns this rank's device."""
    global _host_group
    if not ranks.active:
        return device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    _host_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    return device


def stop(ranks: Ranks) -> None:
    global _host_group
    _host_group = None
    if ranks.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    if ranks.active:
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """Sum over ranks, in place and on the device (an asynchronous collective, not a host sync)."""
    if ranks.active:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, ranks: Ranks) -> bool:
    """True on every rank when ``flag`` is true on any (e.g. one rank got SIGTERM).

    A host-side (gloo) collective: cheap enough for every step, and it never waits for the GPU.
    """
    if not ranks.active:
        return flag
    import torch.distributed as dist

    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_host_group)
    return bool(value.item())


def wrap(model: torch.nn.Module, ranks: Ranks) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` when distributed, else ``model`` itself."""
    if not ranks.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    # A batch may hold one modality only: the other stems then get no gradient in that step.
    # No device_ids: inputs are already on the device, and DDP would otherwise move the modality
    # index there too, making the stems' routing wait for the GPU every step.
    return DistributedDataParallel(model, device_ids=None, find_unused_parameters=True)


def per_rank_batch(batch_size: int, ranks: Ranks) -> int:
    """This rank's share of the global batch; the global batch must split evenly."""
    if batch_size % ranks.world:
        raise ConfigError(
            f"pretrain.batch_size {batch_size} (the global batch) does not split evenly over {ranks.world} processes"
        )
    return batch_size // ranks.world


def training_processes(config: Mapping[str, Any], gpus_given: int | None = None) -> int:
    """``pretrain.processes``, or one per GPU the job was given, at least 1.

    ``gpus_given``: the rule's ``gpu`` resource as the scheduler granted it (a profile's
    ``set-resources`` may raise it above the config's ``resources.gpus``).
    """
    settings = Settings.of(config)  # the schema bounds pretrain.processes (>= 1 or null)
    if settings.pretrain.processes is not None:
        return settings.pretrain.processes
    if gpus_given is None:
        gpus_given = settings.resources.gpus
    return max(1, int(gpus_given))


def launch(entry: str, processes: int, kwargs: dict[str, Any], worker_log: str | None = None) -> Any:
    """Run entry point ``entry`` with ``kwargs`` in this process, or under torchrun with ``processes`` ranks.

    Already inside a distributed job (torchrun or srun set WORLD_SIZE), the call runs directly.
    ``worker_log``: the file the ranks append their log lines to (the rule's log).
    """
    if entry not in ENTRY_POINTS:
        raise ConfigError(f"unknown training entry point {entry!r}; choose from {sorted(ENTRY_POINTS)}")
    if processes <= 1 or from_environment().active:
        return _resolve(entry)(**kwargs)
    from duplus.train.interrupt import StopFlag

    with tempfile.TemporaryDirectory(prefix="duplus-launch-") as folder:
        arguments = Path(folder) / "arguments.json"
        arguments.write_text(json.dumps({"entry": entry, "kwargs": kwargs, "log_path": worker_log}, default=str),
                             encoding="utf-8")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   "-m", "duplus.train.distributed", str(arguments)]
        log.info("launching %s on %d processes: %s", entry, processes, " ".join(command))
        # A SIGTERM here (scancel, a preemption notice sent to this process only) goes on to torchrun,
        # which hands it to the ranks; this process waits until they have checkpointed and left.
        with StopFlag() as stop:
            process = subprocess.Popen(command)
            forwarded = False
            while process.poll() is None:
                if stop.requested and not forwarded:
                    process.send_signal(signal.SIGTERM)
                    forwarded = True
                try:
                    process.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    pass
        stopped = sorted(Path(folder).glob(f"{INTERRUPTED}*"))
        message = stopped[0].read_text(encoding="utf-8") if stopped else ""
    if process.returncode != 0 and (stopped or stop.requested):
        raise TrainingInterrupted(message or f"distributed {entry} stopped on request; rerun to resume from its checkpoint")
    if process.returncode != 0:
        raise DuplusError(f"distributed {entry} failed (torchrun exit code {process.returncode}); see the ranks' messages above")
    return None


def _resolve(entry: str) -> Callable[..., Any]:
    import importlib

    module, name = ENTRY_POINTS[entry].split(":")
    return getattr(importlib.import_module(module), name)


def main(argv: list[str] | None = None) -> int:
    """Worker side of ``launch``: read the arguments file and run the entry point on this rank."""
    from duplus.runtime import setup_logging

    args = argv if argv is not None else sys.argv[1:]
    payload = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    setup_logging(payload.get("log_path"))

    try:
        from duplus.stage import declare_config_classes

        declare_config_classes(payload["kwargs"])  # a rank is a fresh process: the config's own classes first
        _resolve(payload["entry"])(**payload["kwargs"])
    except TrainingInterrupted as error:
        # torchrun reports any non-zero exit as a failure; the launcher reads this to tell a
        # checkpointed stop (rerun resumes) from a crash.
        rank = os.environ.get("RANK", "0")
        (Path(args[0]).parent / f"{INTERRUPTED}{rank}").write_text(str(error), encoding="utf-8")
        log.warning("rank %s: %s", rank, error)
        return 1
    except DuplusError as error:
        log.error("rank %s: %s", os.environ.get("RANK", "?"), error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
