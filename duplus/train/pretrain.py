"""Universal pretraining: one text-steered network trained on every dataset and modality at once.

A killed or preempted run restarted resumes from its newest complete checkpoint (bit-identical on CPU).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd
import torch

from duplus.atomic import write_csv
from duplus.errors import CheckpointError, ConfigError, TrainingInterrupted
from duplus.hashing import sha256_text
from duplus.progress import progress
from duplus.runtime import device_for, seed_everything
from duplus.tracked import results_only
from duplus.train import distributed
from duplus.train.batches import TextTable, accumulated_loss, open_prompt_cache
from duplus.train.cases import preprocessed_sha256, pretraining_cases
from duplus.train.checkpoint import load_latest_checkpoint, rng_state, save_checkpoint, set_rng_state
from duplus.train.divergence import DivergenceWatch
from duplus.train.ema import EMA
from duplus.train.interrupt import StopFlag
from duplus.train.optim import GRAD_CLIP, build_optimizer, resolve_amp, warmup_cosine
from duplus.train.sampling import PatchSampler, make_loader, workers_closed

log = logging.getLogger(__name__)

LOG_COLUMNS = ["step", "loss", "lr", "seconds"]


@dataclass(frozen=True)
class PretrainSettings:
    """``config["pretrain"]`` with the schema's defaults for absent keys."""

    steps: int = 160000
    batch_size: int = 8
    patch_size: tuple[int, int, int] = (128, 128, 128)
    lr: float = 3e-4
    weight_decay: float = 3e-5
    warmup_steps: int = 1000
    lr_cycles: int = 1
    ema_decay: float = 0.99
    grad_accum: int = 1
    amp: str = "auto"
    checkpoint_every: int = 1000
    log_every: int = 50
    num_workers: int = 4
    foreground_ratio: float = 0.67
    dataset_weights: Mapping[str, float] | None = None
    exclude_centers: Mapping[str, list[str]] | None = None
    compile: bool = False
    channels_last: bool = False
    processes: int | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "PretrainSettings":
        section = dict(config.get("pretrain") or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(section) - known)
        if unknown:
            raise ConfigError(f"pretrain: unknown key(s) {unknown}")
        if "patch_size" in section:
            section["patch_size"] = tuple(int(v) for v in section["patch_size"])
            if len(section["patch_size"]) != 3:
                raise ConfigError(f"pretrain.patch_size must be 3 integers (Z, Y, X), got {section['patch_size']}")
        settings = cls(**section)
        for key in ("steps", "batch_size", "grad_accum", "checkpoint_every", "log_every", "lr_cycles"):
            if int(getattr(settings, key)) < 1:
                raise ConfigError(f"pretrain.{key} must be >= 1, got {getattr(settings, key)}")
        return settings

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
        "seed": int(config.get("seed", 0)),
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
        return _train(config, settings, cases, prompt_cache, out_model, out_log, task_specific, ranks, device)
    finally:
        distributed.stop(ranks)


def _train(
    config: Mapping[str, Any],
    settings: PretrainSettings,
    cases: list[Any],
    prompt_cache: Any,
    out_model: str | os.PathLike,
    out_log: str | os.PathLike,
    task_specific: bool,
    ranks: distributed.Ranks,
    device: torch.device,
) -> dict[str, Any]:
    from duplus.model import DuPLUS, ModelConfig, TaskSpecificNet, save_model, use_channels_last

    seed = int(config.get("seed", 0))
    amp = resolve_amp(settings.amp, device)
    cache = open_prompt_cache(prompt_cache)
    model_config = ModelConfig.from_config(config, text_dim=cache.dim)
    sampler = PatchSampler(
        cases,
        settings.patch_size,
        weights=settings.dataset_weights,
        foreground_ratio=settings.foreground_ratio,
        paraphrases=bool((config.get("prompts") or {}).get("paraphrases", True)),
        modalities=model_config.modalities,
    )
    table = TextTable(cache, sampler.all_texts(), device)
    identity = _run_identity(config, settings, sampler, cache)
    identity["architecture"] = "task_specific" if task_specific else "duplus"
    # The precision amp "auto" chose here: a checkpoint of a bf16 run must not resume as fp16 (its
    # gradient scaler has no state) or silently change precision on another machine.
    identity["precision"] = str(amp)

    seed_everything(seed)
    if task_specific:
        if len(sampler.datasets) != 1:
            raise ConfigError(f"a task-specific network trains on one dataset, got {sampler.datasets}")
        model = TaskSpecificNet(model_config, _classes_per_dataset(sampler)[sampler.datasets[0]]).to(device)
    else:
        model = DuPLUS(model_config).to(device)
        contexts, targets = sampler.text_groups()
        model.set_text_centers(table.mean(contexts), table.mean(targets))
    if settings.channels_last:
        use_channels_last(model)
    optimizer = build_optimizer(model.parameters(), settings.lr, settings.weight_decay, device)
    scheduler = warmup_cosine(optimizer, settings.warmup_steps, settings.steps, settings.lr_cycles)
    ema = EMA(model, settings.ema_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    watch = DivergenceWatch(device, enabled=not scaler.is_enabled())
    running = torch.zeros((), device=device)
    rows: list[dict[str, Any]] = []
    start, seconds_before, micro_batches = 0, 0.0, 0

    folder = Path(out_model).parent / "checkpoints"
    resumed = load_latest_checkpoint(folder)
    if resumed is not None and not _check_resumable(folder, resumed[1]["run"], identity, resumed[0]):
        resumed = None
        distributed.barrier(ranks)  # every rank has read the folder before rank 0 empties it
        if ranks.main:
            shutil.rmtree(folder)
        distributed.barrier(ranks)  # no rank reads the folder while rank 0 empties it
    if resumed is not None:
        start, state = resumed
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        running = state["running_loss"].to(device)
        micro_batches = int(state["micro_batches"])
        rows = list(state["log"])
        seconds_before = float(state["seconds"])
        log.info("resuming pretraining at step %d of %d from %s", start, settings.steps, folder)

    forward_model = distributed.wrap(model, ranks)
    forward_model = torch.compile(forward_model) if settings.compile else forward_model
    started = time.perf_counter()

    def step_total(weight: torch.Tensor) -> torch.Tensor:
        # Global sum of the step's class weights over ranks, divided by the number of ranks: DDP's
        # gradient average then equals the gradient of one process holding the whole batch.
        return distributed.all_reduce_sum(weight, ranks) / ranks.world

    def checkpoint(step: int) -> None:
        # Every rank's partial loss sum since the last log step, averaged over ranks: each rank
        # restores this mean, so the first log row after a resume is the global mean again.
        running_mean = distributed.all_reduce_sum(running.clone(), ranks) / ranks.world
        if not ranks.main:
            distributed.barrier(ranks)  # wait until rank 0 has written it
            return
        save_checkpoint(folder, step, {
            "run": identity,
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "running_loss": running_mean,
            "micro_batches": micro_batches,
            "log": rows,
            "seconds": seconds_before + time.perf_counter() - started,
            "rng": rng_state(device),
        })
        distributed.barrier(ranks)

    distributed.per_rank_batch(settings.batch_size, ranks)
    loader = make_loader(
        sampler, seed, settings.batch_size, settings.grad_accum, start, settings.steps,
        num_workers=settings.num_workers, pin_memory=device.type == "cuda", rank=ranks.rank, world=ranks.world,
    )
    model.train()
    desc = f"baseline {sampler.datasets[0]}" if task_specific else "pretrain"
    with StopFlag() as stop, workers_closed(iter(loader)) as batches, \
            progress(total=settings.steps, initial=start, desc=desc) as bar:
        if resumed is not None:
            # After the loader's iterator, which draws from the torch RNG when created: the restored
            # state is then exactly the one the uninterrupted run had at this step (dropout).
            set_rng_state(resumed[1]["rng"], device)
        for step in range(start, settings.steps):
            lr = scheduler.get_last_lr()[0]
            micro = [next(batches) for _ in range(settings.grad_accum)]
            loss = accumulated_loss(forward_model, micro, table, amp, lambda part: scaler.scale(part).backward(),
                                    step_total)
            running += loss * settings.grad_accum  # stays on the device: no per-step host sync
            micro_batches += settings.grad_accum
            scaler.unscale_(optimizer)
            watch.record(step + 1, torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP, foreach=True))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            ema.update(model)
            done = step + 1
            bar.update(1)
            at_log = done % settings.log_every == 0 or done == settings.steps
            if at_log:
                watch.check(desc, folder)
                total = distributed.all_reduce_sum(running.clone(), ranks) / ranks.world
                mean = (total / max(micro_batches, 1)).item()  # the only sync, every log_every steps
                rows.append({"step": done, "loss": mean, "lr": lr,
                             "seconds": round(seconds_before + time.perf_counter() - started, 3)})
                if ranks.main:
                    _write_log(out_log, rows)
                running.zero_()
                micro_batches = 0
            # Ranks agree on a stop request every step (a host-side collective, no GPU sync), so
            # all of them checkpoint and leave at the same step, well inside the 30 s torchrun
            # gives its workers between forwarding SIGTERM and killing them.
            stopping = distributed.any_rank(stop.requested, ranks)
            if done % settings.checkpoint_every == 0 or done == settings.steps or stopping:
                watch.check(desc, folder)
                checkpoint(done)
            if stopping and done < settings.steps:
                raise TrainingInterrupted(
                    f"{desc} stopped at step {done} of {settings.steps}; checkpoint in {folder}, rerun to resume"
                )

    if not ranks.main:
        return {}
    _write_log(out_log, rows)
    ema.copy_to(model)
    classes = _classes_per_dataset(sampler)
    meta = {
        "averaging": "ema",
        "ema_decay": settings.ema_decay,
        "steps": settings.steps,
        "seed": seed,
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
        "preprocess": dict(config.get("preprocess") or {}),
    }
    sidecar = save_model(model.to("cpu"), out_model, meta=meta)
    log.info("%s done: %d steps, model %s", desc, settings.steps, out_model)
    return sidecar
