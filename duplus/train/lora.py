"""Per-center adaptation: zero-shot vs LoRA vs full fine-tuning of the pretrained model, on one center.

Keeps the LoRA adapter (bound to its base weights) and records dice, gap closed, parameters, time, memory.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd
import torch

from duplus.atomic import replace_folder, write_json
from duplus.data.manifest import CaseRecord, read_manifests, select_cases
from duplus.errors import ConfigError, DataError
from duplus.hashing import sha256_file
from duplus.model.adapters import WEIGHTS_NAME, add_adapter, lora_config_from, save_adapter
from duplus.runtime import device_for, seed_everything
from duplus.settings import Lora, Settings
from duplus.train.adaptation_keys import phase_identities
from duplus.train.batches import TextTable, open_prompt_cache
from duplus.train.finetune import fit
from duplus.train.optim import resolve_amp
from duplus.train.phase_journal import PhaseJournal
from duplus.train.sampling import PatchSampler

log = logging.getLogger(__name__)


def center_spec(config: Mapping[str, Any], center: str) -> tuple[list[str], str]:
    """(datasets, manifest center value) of ``config["lora"]["centers"][center]``.

    A center's ``dataset`` is one name or a list: the datasets holding its scans (HECKTOR's CT and
    PET of one hospital's patients), all learnt by its one adapter.
    """
    from duplus.data.registry import listed_datasets

    centers = Settings.of(config).lora.centers
    if center not in centers:
        raise ConfigError(f"lora.centers.{center} is not configured (configured: {sorted(centers)})")
    spec = centers[center] or {}
    if not spec.get("dataset") or "center" not in spec:
        raise ConfigError(f"lora.centers.{center} needs 'dataset' and 'center', got {dict(spec)}")
    return listed_datasets(spec["dataset"]), str(spec["center"])


def _evaluate(model: torch.nn.Module, cases: list[CaseRecord], cache: Any, config: Mapping[str, Any]) -> pd.DataFrame:
    from duplus.evaluate.case_scores import evaluate_cases

    model.eval()
    return evaluate_cases(model, cases, cache, config)


def _publish(staged: Path, target: Path) -> Path:
    """Copy the journal's adapter folder to ``target``, swapped in whole; returns its weights file.

    A copy, not a move: until metrics.json is written the journal may still be needed to resume.
    """
    building = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    shutil.copytree(staged, building)
    replace_folder(building, target)
    return target / WEIGHTS_NAME


def _mean_dice(frame: pd.DataFrame) -> float | None:
    value = pd.to_numeric(frame["dice"], errors="coerce").mean() if len(frame) else float("nan")
    return None if value is None or math.isnan(value) else float(value)


def _per_class(results: Mapping[str, pd.DataFrame]) -> dict[str, dict[str, float | None]]:
    classes = sorted({c for frame in results.values() for c in frame["class"].astype(str)})
    table: dict[str, dict[str, float | None]] = {}
    for name in classes:
        table[name] = {run: _mean_dice(frame[frame["class"].astype(str) == name]) for run, frame in results.items()}
    return table


def gap_closed(zero: float | None, lora: float | None, full: float | None) -> float | None:
    """(lora - zero) / (full - zero): the share of the full fine-tuning gain LoRA recovers.

    None when full fine-tuning gained nothing over zero-shot: there is no gap to close, and the
    ratio would flip its sign or exceed 1 without meaning either.
    """
    if zero is None or lora is None or full is None or full - zero < 1e-8:
        return None
    return (lora - zero) / (full - zero)


def run_lora(
    config: Mapping[str, Any],
    center: str,
    manifests: Iterable[str | os.PathLike],
    prompt_cache: Any,
    model_path: str | os.PathLike,
    out_dir: str | os.PathLike,
) -> dict[str, Any]:
    """Adapt the pretrained model to ``center``; write ``adapter/``, ``adapter_meta.json``, ``metrics.json``.

    Zero-shot, LoRA and full fine-tuning are scored on the center's test split with
    ``duplus.evaluate.case_scores.evaluate_cases``; LoRA and full fine-tuning train on its train split with
    the same batches and step budget. Peak memory (RSS, and CUDA memory on a GPU) is measured for
    each training on its own (``duplus.train.finetune.FitStats``). A killed or SIGTERMed job
    resumes: finished phases are kept in ``<out_dir>/.resume/`` (``duplus.train.phase_journal``,
    keyed per phase by ``duplus.train.adaptation_keys``) and trainings checkpoint every
    ``lora.checkpoint_every`` steps.

    Returns:
        the metrics written to ``metrics.json``.

    Raises:
        ConfigError: the center is not configured.
        DataError: a dataset of the center is in no manifest, or lacks train or test cases there.
        TrainingInterrupted: after SIGTERM, once the training in progress is checkpointed.
    """
    job = _prepare(config, center, [str(m) for m in manifests], prompt_cache, model_path, Path(out_dir))
    runs: dict[str, dict[str, Any]] = {}
    results = {"zero_shot": _zero_shot(job)}
    targets = _targets(job)
    lora_config = lora_config_from(job.settings, targets)
    runs["lora"], results["lora"] = _lora_phase(job, lora_config)
    runs["full_ft"], results["full_ft"] = _full_fine_tuning(job)
    return _write_outputs(job, runs, results, lora_config, targets)


@dataclass
class _Job:
    """One center's adaptation: its cases, the base model, and what every phase shares."""

    config: Mapping[str, Any]  # with the base model's window
    center: str
    datasets: list[str]
    site: str
    train_cases: list[CaseRecord]
    test_cases: list[CaseRecord]
    model_path: Path
    base: torch.nn.Module
    base_sha: str
    cache: Any
    sampler: PatchSampler
    table: TextTable
    journal: PhaseJournal
    keys: dict[str, Any]  # per phase, what it depends on (duplus.train.adaptation_keys)
    training: dict[str, Any]  # fit()'s settings, the same for LoRA and full fine-tuning
    device: torch.device
    out: Path

    @property
    def settings(self) -> Lora:
        return Settings.of(self.config).lora

    def count(self, name: str) -> tuple[int, int]:
        """(train, test) cases of dataset ``name``."""
        return sum(c.dataset == name for c in self.train_cases), sum(c.dataset == name for c in self.test_cases)

    def evaluate(self, model: torch.nn.Module, what: str) -> pd.DataFrame:
        log.info("lora %s: scoring the %s model on %d test cases", self.center, what, len(self.test_cases))
        return _evaluate(model, self.test_cases, self.cache, self.config)


def _center_cases(config: Mapping[str, Any], center: str, manifests: list[str],
                  ) -> tuple[list[str], str, list[CaseRecord], list[CaseRecord]]:
    """(datasets, site, train cases, test cases) of ``center``; every dataset must have both splits there."""
    datasets, site = center_spec(config, center)
    records = read_manifests(manifests)
    known = {record.dataset for record in records}
    missing = [name for name in datasets if name not in known]
    if missing:
        raise DataError(f"dataset(s) {missing} are in none of the manifests {manifests}")
    train_cases = select_cases(records, split="train", datasets=datasets, centers=[site])
    test_cases = select_cases(records, split="test", datasets=datasets, centers=[site])
    counts = {name: (sum(c.dataset == name for c in train_cases), sum(c.dataset == name for c in test_cases))
              for name in datasets}
    short = [f"dataset '{name}' center '{site}' has {n_train} train and {n_test} test cases"
             for name, (n_train, n_test) in counts.items() if not (n_train and n_test)]
    if short:
        # Every scan of the center is adapted to and scored: one missing would leave its numbers unsaid.
        raise DataError(f"lora.centers.{center}: " + "; ".join(short) + "; both splits need at least one")
    for name in datasets:
        held_out = Settings.of(config).pretrain.exclude_centers.get(name) or []
        if site not in held_out:
            log.warning("lora.centers.%s: center %s of %s was not held out of pretraining "
                        "(pretrain.exclude_centers), so its zero-shot score is not zero-shot", center, site, name)
    return datasets, site, train_cases, test_cases


def _prepare(config: Mapping[str, Any], center: str, manifests: list[str], prompt_cache: Any,
             model_path: str | os.PathLike, out: Path) -> _Job:
    """The center's cases, the verified base model, the patch sampler and each phase's resume key."""
    from duplus.model import load_model, modalities_of, with_trained_window

    datasets, site, train_cases, test_cases = _center_cases(config, center, manifests)
    device = device_for(config)
    amp = resolve_amp(Settings.of(config).pretrain.amp, device)
    cache = open_prompt_cache(prompt_cache)
    base_sha = sha256_file(model_path)
    base, base_meta = load_model(model_path, expected_sha256=base_sha, device=device)
    # Train and score with the base model's window, whatever the config says now.
    config = with_trained_window(config, base_meta)
    settings = Settings.of(config)
    pretrain = settings.pretrain
    sampler = PatchSampler(
        train_cases, pretrain.patch_size,
        foreground_ratio=pretrain.foreground_ratio,
        paraphrases=settings.prompts.paraphrases,
        modalities=modalities_of(base),
    )
    table = TextTable(cache, sampler.all_texts(), device)
    journal = PhaseJournal(out)
    keys = phase_identities(config, center=(*datasets, site), base_sha256=base_sha, train_cases=train_cases,
                            test_cases=test_cases, cache=cache, amp=amp, device=device)
    lora = settings.lora
    training = {"steps": lora.steps, "batch_size": lora.batch_size, "seed": settings.seed, "amp": amp,
                "num_workers": pretrain.num_workers, "checkpoint_every": lora.checkpoint_every}
    return _Job(config, center, datasets, site, train_cases, test_cases, Path(model_path), base, base_sha, cache,
                sampler, table, journal, keys, training, device, out)


def _zero_shot(job: _Job) -> pd.DataFrame:
    """Per-case scores of the base model as it is (phase ``zero_shot``)."""
    if (done := job.journal.load("zero_shot", job.keys["zero_shot"])) is not None:
        return done[1]
    frame = job.evaluate(job.base, "pretrained (zero-shot)")
    job.journal.save("zero_shot", job.keys["zero_shot"], {}, frame)
    return frame


def _targets(job: _Job) -> list[str]:
    """The base model's modules that get LoRA factors (``lora.targets``, stems of the center's modalities)."""
    from duplus.model import lora_target_names

    settings = job.settings
    return lora_target_names(job.base, list(settings.targets), settings.text_projection,
                             modalities=sorted({case.modality for case in job.train_cases}))


def _complete(record: Mapping[str, Any]) -> bool:
    """Whether a journal record of a training phase holds its bookkeeping."""
    return {"seconds", "rss_mb", "trainable"} <= set(record)


def _staged_adapter(job: _Job) -> Path:
    # The LoRA phase's adapter is kept in the journal until the stage ends: adapter/ is a declared
    # output of the rule, which Snakemake deletes before it reruns a killed or failed job.
    return job.journal.folder / "lora_adapter"


def _adapt(job: _Job, phase: str, model: torch.nn.Module, lr: float, desc: str) -> tuple[dict[str, Any], pd.DataFrame]:
    """Train ``model`` (checkpointed in the journal) and score it: (bookkeeping, per-case scores)."""
    from duplus.model import count_parameters

    trainable = count_parameters(model, trainable_only=True)
    log.info("%s: %d steps of %d patches at lr %g, %d trainable parameters", desc, job.training["steps"],
             job.training["batch_size"], lr, trainable)
    stats = fit(model, job.sampler, job.table, lr=lr, desc=desc,
                checkpoints=job.journal.checkpoints(phase, job.keys[phase]), **job.training)
    frame = job.evaluate(model, {"lora": "LoRA-adapted", "full_ft": "fully fine-tuned"}[phase])
    return {**asdict(stats), "trainable": trainable}, frame


def _lora_phase(job: _Job, lora_config: Any) -> tuple[dict[str, Any], pd.DataFrame]:
    """Train the center's adapter on a copy of the base, score it and stage it (phase ``lora``)."""
    staged = _staged_adapter(job)
    adapter_file = staged / WEIGHTS_NAME
    done = job.journal.load("lora", job.keys["lora"], accept=lambda record: _complete(record) and adapter_file.is_file()
                            and sha256_file(adapter_file) == record.get("adapter_sha256"))
    if done is not None:
        return done
    adapted = copy.deepcopy(job.base)
    seed_everything(job.training["seed"])  # peft draws the LoRA A factors at random: the run's seed decides them
    add_adapter(adapted, lora_config, job.center)
    run, frame = _adapt(job, "lora", adapted, job.settings.lr, f"lora {job.center}")
    save_adapter(adapted, job.center, lora_config, staged, job.base_sha)
    run["adapter_sha256"] = sha256_file(adapter_file)
    job.journal.save("lora", job.keys["lora"], run, frame)
    return run, frame


def _full_fine_tuning(job: _Job) -> tuple[dict[str, Any], pd.DataFrame]:
    """Train every weight of a copy of the base on the same batches, and score it (phase ``full_ft``)."""
    if (done := job.journal.load("full_ft", job.keys["full_ft"], accept=_complete)) is not None:
        return done
    tuned = copy.deepcopy(job.base)
    for param in tuned.parameters():
        param.requires_grad_(True)
    seed_everything(job.training["seed"])  # the same random stream (dropout) as the LoRA run
    run, frame = _adapt(job, "full_ft", tuned, job.settings.full_finetune_lr,
                        f"full fine-tuning {job.center}")
    job.journal.save("full_ft", job.keys["full_ft"], run, frame)
    return run, frame


def _metrics(job: _Job, runs: Mapping[str, Mapping[str, Any]], results: Mapping[str, pd.DataFrame],
             adapter_file: Path) -> dict[str, Any]:
    """``metrics.json``: the three runs' dice, gap closed, parameters, seconds and peak memory."""
    from duplus.model import count_parameters

    dice = {run: _mean_dice(frame) for run, frame in results.items()}
    metrics: dict[str, Any] = {
        "center": job.center,
        "dataset": " + ".join(job.datasets),  # as the report's table names the center's data
        "datasets": job.datasets,
        "site": job.site,
        "zero_shot_dice": dice["zero_shot"],
        "lora_dice": dice["lora"],
        "full_ft_dice": dice["full_ft"],
        "gap_closed": gap_closed(dice["zero_shot"], dice["lora"], dice["full_ft"]),
        "trainable_params_lora": int(runs["lora"]["trainable"]),
        "trainable_params_full": int(runs["full_ft"]["trainable"]),
        "total_params": int(count_parameters(job.base)),
        "adapter_bytes": adapter_file.stat().st_size,
        "checkpoint_bytes": job.model_path.stat().st_size,
        "seconds_lora": runs["lora"]["seconds"],
        "seconds_full": runs["full_ft"]["seconds"],
        "peak_rss_mb_lora": runs["lora"]["rss_mb"],
        "peak_rss_mb_full": runs["full_ft"]["rss_mb"],
        "steps": job.training["steps"],
        "train_cases": len(job.train_cases),
        "test_cases": len(job.test_cases),
        "device": str(job.device),
        "per_class": _per_class(results),
        "per_dataset": {name: {**{run: _mean_dice(frame[frame["dataset"].astype(str) == name])
                                  for run, frame in results.items()},
                               "train_cases": job.count(name)[0], "test_cases": job.count(name)[1]}
                        for name in job.datasets},
        # Phases an earlier, interrupted attempt finished (their seconds and peaks are that attempt's).
        "resumed_phases": list(job.journal.resumed),
    }
    if job.device.type == "cuda":
        metrics["peak_cuda_mb_lora"] = runs["lora"].get("cuda_mb")
        metrics["peak_cuda_mb_full"] = runs["full_ft"].get("cuda_mb")
    return metrics


def _adapter_meta(job: _Job, runs: Mapping[str, Mapping[str, Any]], metrics: Mapping[str, Any],
                  lora_config: Any, targets: list[str]) -> dict[str, Any]:
    """``adapter_meta.json``: what the adapter is bound to (base weights, classes, modules) and its scores."""
    from duplus.data.taxonomy import class_record, declared_lineage

    label_map = {str(k): v for k, v in sorted(job.train_cases[0].label_map.items())}
    center_classes = list(dict.fromkeys(name for case in job.train_cases for name in case.classes))
    return {
        "base_sha256": job.base_sha,
        "base_model": job.model_path.name,
        "adapter_sha256": runs["lora"]["adapter_sha256"],  # hashed when written, checked when resumed
        "center": job.center,
        "dataset": metrics["dataset"],
        "datasets": job.datasets,
        "site": job.site,
        "label_map": label_map,
        "classes": center_classes,
        # Classes of the config's own among them, as the base model's sidecar records its (duplus.segment.knowledge).
        "declared_classes": [class_record(info) for info in declared_lineage(center_classes)],
        "target_modules": targets,
        "rank": lora_config.r,
        "alpha": lora_config.lora_alpha,
        "text_encoder": str(getattr(job.cache, "encoder_identity", "")),
        "metrics": {k: metrics[k] for k in ("zero_shot_dice", "lora_dice", "full_ft_dice", "gap_closed")},
    }


def _write_outputs(job: _Job, runs: Mapping[str, Mapping[str, Any]], results: Mapping[str, pd.DataFrame],
                   lora_config: Any, targets: list[str]) -> dict[str, Any]:
    """Publish the adapter, write ``adapter_meta.json`` and ``metrics.json`` (last), then drop the journal."""
    adapter_file = _publish(_staged_adapter(job), job.out / "adapter")
    metrics = _metrics(job, runs, results, adapter_file)
    write_json(job.out / "adapter_meta.json", _adapter_meta(job, runs, metrics, lora_config, targets))
    write_json(job.out / "metrics.json", metrics)  # last: it is the rule's declared output
    job.journal.clear()
    log.info("lora %s: dice zero-shot %s, LoRA %s, full %s", job.center, metrics["zero_shot_dice"],
             metrics["lora_dice"], metrics["full_ft_dice"])
    return metrics
