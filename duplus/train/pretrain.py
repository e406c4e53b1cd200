"""Universal pretraining: one text-steered network trained on every dataset and modality at once.

A killed or preempted run restarted resumes from its newest complete checkpoint (bit-identical on CPU).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd
import torch

from duplus.atomic import write_csv
from duplus.errors import CheckpointError, ConfigError, TrainingInterrupted
from duplus.hashing import sha256_text
from duplus.progress import progress
from duplus.runtime import device_for, seed_everything
from duplus.settings import Pretrain, Settings
from duplus.tracked import results_only
from duplus.train import distributed
from duplus.train.batches import TextTable, open_prompt_cache
from duplus.train.cases import preprocessed_sha256, pretraining_cases
from duplus.train.checkpoint import RandomState, TrainState, Value, load_latest_checkpoint, save_checkpoint
from duplus.train.interrupt import StopFlag
from duplus.train.optim import resolve_amp
from duplus.train.sampling import PatchSampler, make_loader, workers_closed
from duplus.train.step import TrainingStep

log = logging.getLogger(__name__)

LOG_COLUMNS = ["step", "loss", "lr", "seconds"]


class PretrainSettings(Pretrain):
    """``config["pretrain"]`` with the schema's defaults for absent keys (``duplus.settings.Pretrain``)."""

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "PretrainSettings":
        """The section's settings; the schema bounds them (ConfigError naming the key)."""
        section = Settings.of(config).pretrain
        return cls(**{f.name: getattr(section, f.name) for f in fields(section)})

    def fingerprint(self) -> dict[str, Any]:
        """Settings that change the numbers a run produces (``duplus.tracked.SPEED_ONLY`` left out)."""
        data = results_only("pretrain", asdict(self))
        data["patch_size"] = list(self.patch_size)
        if self.lr_cycles == 1:
            data.pop("lr_cycles")  # the plain schedule: runs checkpointed before the key existed still resume
        return json.loads(json.dumps(data, sort_keys=True, default=dict))


def _run_identity(config: Mapping[str, Any], settings: PretrainSettings, sampler: PatchSampler, cache: Any) -> dict[str, Any]:
    cases = [c for cs in sampler.by_dataset.values() for c in cs]
    return {
        "seed": Settings.of(config).seed,
        "pretrain": settings.fingerprint(),
        "model": json.loads(json.dumps(config.get("model") or {}, sort_keys=True)),
        "paraphrases": sampler.paraphrases,
        "cases_sha256": sha256_text("\n".join(sorted(f"{c.dataset}/{c.case}" for c in cases))),
        "preprocessed_sha256": preprocessed_sha256(cases),
        "prompt_cache": str(getattr(cache, "encoder_identity", "")),
    }


def _check_resumable(folder: Path, saved: Mapping[str, Any], current: Mapping[str, Any], step: int) -> bool:
    """Whether the checkpoint of ``step`` continues this run (True) or is a finished other run's (False).

    Raises CheckpointError for an unfinished run with other settings or data: a long run is not
    thrown away over a setting changed by accident.
    """
    if "preprocessed_sha256" not in saved:
        # Checkpoints written before the data were part of the identity: a long run keeps going,
        # on the user's word that the preprocessed store has not changed since.
        log.warning("%s: these checkpoints do not record which preprocessed data they were trained on; resuming "
                    "as if the store were unchanged (delete the folder if it was preprocessed again)", folder)
        current = {k: v for k, v in current.items() if k != "preprocessed_sha256"}
    differing = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if not differing:
        return True
    if step >= int((saved.get("pretrain") or {}).get("steps", step + 1)):
        # A finished run, whose model Snakemake has just removed to train under the new settings.
        log.warning("%s: checkpoints of a finished run with different %s; training anew", folder, differing)
        return False
    raise CheckpointError(
        f"{folder}: the checkpoints there come from an unfinished run with different {differing}; "
        "delete the folder to start over, or restore the settings to resume"
    )


def _write_log(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    write_csv(path, pd.DataFrame(rows, columns=LOG_COLUMNS))


def _classes_per_dataset(sampler: PatchSampler) -> dict[str, list[str]]:
    return {name: sampler.by_dataset[name][0].classes for name in sampler.datasets}


def _declared_records(classes: Mapping[str, list[str]]) -> list[dict[str, Any]]:
    from duplus.data.taxonomy import class_record, declared_lineage

    return [class_record(info) for info in declared_lineage([name for names in classes.values() for name in names])]


def run_pretrain(
    config: Mapping[str, Any],
    manifests: Iterable[str | os.PathLike],
    prompt_cache: Any,
    out_model: str | os.PathLike,
    out_log: str | os.PathLike,
) -> dict[str, Any]:
    """Train the universal model on the train split of ``manifests``; write EMA weights and the log.

    Args:
        config: the full validated pipeline config.
        manifests: ``manifest.csv`` of every dataset.
        prompt_cache: path of the prompt cache (or a loaded ``PromptCache``).
        out_model: ``.../model.safetensors``; checkpoints go to ``checkpoints/`` beside it.
        out_log: ``train_log.csv`` (``step, loss, lr, seconds``).

    Returns:
        the model sidecar written by ``save_model``.

    Raises:
        TrainingInterrupted: after SIGTERM, once the current step is done and checkpointed.
    """
    settings = PretrainSettings.from_config(config)
    cases = pretraining_cases(config, [str(m) for m in manifests])
    return train_network(config, settings, cases, prompt_cache, out_model, out_log)


def train_network(
    config: Mapping[str, Any],
    settings: PretrainSettings,
    cases: list[Any],
    prompt_cache: Any,
    out_model: str | os.PathLike,
    out_log: str | os.PathLike,
    task_specific: bool = False,
) -> dict[str, Any]:
    """The training loop shared by universal pretraining and the task-specific baseline.

    ``task_specific``: train the prompt-free baseline network (one dataset's cases only) instead
    of the universal one; everything else (sampling, loss, schedule, EMA, checkpoints) is identical,
    which is what makes the comparison fair. Under torchrun it trains data-parallel (see
    ``duplus.train.distributed``).
    """
    ranks = distributed.from_environment()
    device = distributed.start(ranks, device_for(config))
    try:
        run = _set_up(config, settings, cases, prompt_cache, out_model, out_log, task_specific, ranks, device)
        losses = _train(run, _resume_point(run))
        return _save_model(run, losses) if ranks.main else {}
    finally:
        distributed.stop(ranks)


@dataclass
class _Run:
    """What the set-up of a training run builds: its data, network, step and identity."""

    config: Mapping[str, Any]
    settings: PretrainSettings
    ranks: distributed.Ranks
    device: torch.device
    cache: Any
    sampler: PatchSampler
    model: torch.nn.Module
    step: TrainingStep
    identity: dict[str, Any]
    folder: Path  # the checkpoints
    out_model: Path
    out_log: Path
    desc: str


def _set_up(
    config: Mapping[str, Any],
    settings: PretrainSettings,
    cases: list[Any],
    prompt_cache: Any,
    out_model: str | os.PathLike,
    out_log: str | os.PathLike,
    task_specific: bool,
    ranks: distributed.Ranks,
    device: torch.device,
) -> _Run:
    """Sampler, prompt table, seeded network and its training step; nothing read from checkpoints yet."""
    from duplus.model import ModelConfig, use_channels_last

    amp = resolve_amp(settings.amp, device)
    cache = open_prompt_cache(prompt_cache)
    model_config = ModelConfig.from_config(config, text_dim=cache.dim)
    sampler = PatchSampler(
        cases,
        settings.patch_size,
        weights=settings.dataset_weights,
        foreground_ratio=settings.foreground_ratio,
        paraphrases=Settings.of(config).prompts.paraphrases,
        modalities=model_config.modalities,
    )
    table = TextTable(cache, sampler.all_texts(), device)
    identity = _run_identity(config, settings, sampler, cache)
    identity["architecture"] = "task_specific" if task_specific else "duplus"
    # The precision amp "auto" chose here: a checkpoint of a bf16 run must not resume as fp16 (its
    # gradient scaler has no state) or silently change precision on another machine.
    identity["precision"] = str(amp)

    seed_everything(Settings.of(config).seed)
    model = _network(model_config, sampler, table, task_specific).to(device)
    if settings.channels_last:
        use_channels_last(model)
    forward = distributed.wrap(model, ranks)

    def step_total(weight: torch.Tensor) -> torch.Tensor:
        # Global sum of the step's class weights over ranks, divided by the number of ranks: DDP's
        # gradient average then equals the gradient of one process holding the whole batch.
        return distributed.all_reduce_sum(weight, ranks) / ranks.world

    step = TrainingStep(model, table, amp, lr=settings.lr, weight_decay=settings.weight_decay,
                        warmup_steps=settings.warmup_steps, steps=settings.steps, lr_cycles=settings.lr_cycles,
                        ema_decay=settings.ema_decay, forward=torch.compile(forward) if settings.compile else forward,
                        weight_total=step_total)
    return _Run(config, settings, ranks, device, cache, sampler, model, step, identity,
                folder=Path(out_model).parent / "checkpoints", out_model=Path(out_model), out_log=Path(out_log),
                desc=f"baseline {sampler.datasets[0]}" if task_specific else "pretrain")


def _network(model_config: Any, sampler: PatchSampler, table: TextTable, task_specific: bool) -> torch.nn.Module:
    """The freshly initialised network: the universal one, or one dataset's prompt-free baseline."""
    from duplus.model import DuPLUS, TaskSpecificNet

    if task_specific:
        if len(sampler.datasets) != 1:
            raise ConfigError(f"a task-specific network trains on one dataset, got {sampler.datasets}")
        return TaskSpecificNet(model_config, _classes_per_dataset(sampler)[sampler.datasets[0]])
    model = DuPLUS(model_config)
    contexts, targets = sampler.text_groups()
    model.set_text_centers(table.mean(contexts), table.mean(targets))
    return model


def _resume_point(run: _Run) -> tuple[int, dict[str, Any]] | None:
    """(step, state) of the newest checkpoint of this run, or None to start from step 0.

    A finished other run's checkpoints are deleted; an unfinished other run's are refused (``_check_resumable``).
    """
    resumed = load_latest_checkpoint(run.folder)
    if resumed is None or _check_resumable(run.folder, resumed[1]["run"], run.identity, resumed[0]):
        return resumed
    distributed.barrier(run.ranks)  # every rank has read the folder before rank 0 empties it
    if run.ranks.main:
        shutil.rmtree(run.folder)
    distributed.barrier(run.ranks)  # no rank reads the folder while rank 0 empties it
    return None


class _LossLog:
    """The training log: the loss summed on the device since the last row, the rows so far, the seconds trained.

    All three go into every checkpoint (``parts``), so the first row after a resume is the one
    the uninterrupted run wrote.
    """

    def __init__(self, path: Path, device: torch.device, ranks: distributed.Ranks) -> None:
        self.path, self.ranks = path, ranks
        self.running = torch.zeros((), device=device)
        self.micro_batches = 0
        self.rows: list[dict[str, Any]] = []
        self.seconds_before = 0.0
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, micro_batches: int) -> None:
        self.running += loss * micro_batches  # stays on the device: no per-step host sync
        self.micro_batches += micro_batches

    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started

    def running_mean(self) -> torch.Tensor:
        """Every rank's partial loss sum since the last row, averaged over ranks (a collective)."""
        return distributed.all_reduce_sum(self.running.clone(), self.ranks) / self.ranks.world

    def row(self, step: int, lr: float) -> None:
        """Log the mean loss since the last row (the only host sync, every ``log_every`` steps)."""
        mean = (self.running_mean() / max(self.micro_batches, 1)).item()
        self.rows.append({"step": step, "loss": mean, "lr": lr, "seconds": round(self.seconds(), 3)})
        if self.ranks.main:
            self.write()
        self.running.zero_()
        self.micro_batches = 0

    def write(self) -> None:
        _write_log(self.path, self.rows)

    def parts(self) -> dict[str, Value]:
        """The log's checkpoint parts. Each rank restores the mean over ranks, whose sum is the global one."""
        return {
            "running_loss": Value(self.running_mean, lambda saved: self.running.copy_(saved)),
            "micro_batches": Value(lambda: self.micro_batches, lambda saved: setattr(self, "micro_batches", int(saved))),
            "log": Value(lambda: self.rows, lambda saved: setattr(self, "rows", list(saved))),
            "seconds": Value(self.seconds, lambda saved: setattr(self, "seconds_before", float(saved))),
        }


def _train_state(run: _Run, losses: _LossLog) -> TrainState:
    """What a pretraining checkpoint holds, saved and restored from this one list (names as ever written)."""
    step = run.step
    return TrainState({
        "run": Value(lambda: run.identity),  # compared before anything is restored (``_resume_point``)
        "model": run.model,
        "ema": step.ema,
        "optimizer": step.optimizer,
        "scheduler": step.scheduler,
        "scaler": step.scaler,
        **losses.parts(),
        "rng": RandomState(run.device),
    })


def _checkpoint(run: _Run, state: TrainState, step: int) -> None:
    """Write the checkpoint of ``step`` (rank 0); every rank takes part, as the running loss is averaged over them."""
    run.step.watch.check(run.desc, run.folder)
    saved = state.state_dict()
    if run.ranks.main:
        save_checkpoint(run.folder, step, saved)
    distributed.barrier(run.ranks)  # no rank goes on before rank 0 has written it


def _train(run: _Run, resumed: tuple[int, dict[str, Any]] | None) -> _LossLog:
    """The optimizer steps from ``resumed`` (or step 0) to the last, with log rows and checkpoints.

    Raises:
        TrainingInterrupted: after SIGTERM, once the current step is done and checkpointed.
    """
    settings, ranks, step = run.settings, run.ranks, run.step
    start = resumed[0] if resumed is not None else 0
    losses = _LossLog(run.out_log, run.device, ranks)
    state = _train_state(run, losses)
    seed = Settings.of(run.config).seed
    distributed.per_rank_batch(settings.batch_size, ranks)
    loader = make_loader(
        run.sampler, seed, settings.batch_size, settings.grad_accum, start, settings.steps,
        num_workers=settings.num_workers, pin_memory=run.device.type == "cuda", rank=ranks.rank, world=ranks.world,
    )
    run.model.train()
    with StopFlag() as stop, workers_closed(iter(loader)) as batches, \
            progress(total=settings.steps, initial=start, desc=run.desc) as bar:
        if resumed is not None:
            # After the loader's iterator, which draws from the torch RNG when created: the restored
            # state is then exactly the one the uninterrupted run had at this step (dropout).
            state.load_state_dict(resumed[1], run.folder)
            log.info("resuming %s at step %d of %d from %s", run.desc, start, settings.steps, run.folder)
        for done in range(start + 1, settings.steps + 1):
            lr = step.lr
            losses.add(step(done, [next(batches) for _ in range(settings.grad_accum)]), settings.grad_accum)
            bar.update(1)
            if done % settings.log_every == 0 or done == settings.steps:
                step.watch.check(run.desc, run.folder)
                losses.row(done, lr)
            # Ranks agree on a stop request every step (a host-side collective, no GPU sync), so
            # all of them checkpoint and leave at the same step, well inside the 30 s torchrun
            # gives its workers between forwarding SIGTERM and killing them.
            stopping = distributed.any_rank(stop.requested, ranks)
            if done % settings.checkpoint_every == 0 or done == settings.steps or stopping:
                _checkpoint(run, state, done)
            if stopping and done < settings.steps:
                raise TrainingInterrupted(f"{run.desc} stopped at step {done} of {settings.steps}; checkpoint in "
                                          f"{run.folder}, rerun to resume")
    return losses


def _save_model(run: _Run, losses: _LossLog) -> dict[str, Any]:
    """Write the log and the EMA weights with their sidecar; returns the sidecar."""
    from duplus.model import save_model

    settings, sampler, cache = run.settings, run.sampler, run.cache
    losses.write()
    assert run.step.ema is not None
    run.step.ema.copy_to(run.model)
    classes = _classes_per_dataset(sampler)
    meta = {
        "averaging": "ema",
        "ema_decay": settings.ema_decay,
        "steps": settings.steps,
        "seed": Settings.of(run.config).seed,
        "datasets": sampler.datasets,
        "classes": classes,
        # Where each dataset's classes were seen, and the classes of the config's own it trained on: the
        # model is then prompted by them, and says what it knows, without the config (duplus.segment.knowledge).
        "dataset_scans": {name: {"modality": sampler.by_dataset[name][0].modality,
                                 "region": sampler.by_dataset[name][0].region} for name in sampler.datasets},
        "declared_classes": _declared_records(classes),
        "text_encoder": str(getattr(cache, "encoder_identity", "")),
        "prompt_cache": str(getattr(cache, "encoder_identity", "")),
        "patch_size": list(settings.patch_size),
        # The model describes itself: a new scan must be preprocessed exactly as its training data.
        "preprocess": dict(run.config.get("preprocess") or {}),
    }
    sidecar = save_model(run.model.to("cpu"), run.out_model, meta=meta)
    log.info("%s done: %d steps, model %s", run.desc, settings.steps, run.out_model)
    return sidecar
