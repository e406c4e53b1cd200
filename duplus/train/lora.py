"""Per-center adaptation: zero-shot vs LoRA vs full fine-tuning of the pretrained model, on one center.

Keeps the LoRA adapter (bound to its base weights) and records dice, gap closed, parameters, time, memory.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
from dataclasses import asdict
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

    centers = (config.get("lora") or {}).get("centers") or {}
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
    """
    from duplus.data.taxonomy import class_record, declared_lineage
    from duplus.model import count_parameters, load_model, lora_target_names, modalities_of, with_trained_window

    settings = dict(config.get("lora") or {})
    datasets, site = center_spec(config, center)
    dataset = " + ".join(datasets)  # as the report's table names the center's data
    manifests = [str(m) for m in manifests]
    out = Path(out_dir)
    device = device_for(config)
    amp = resolve_amp((config.get("pretrain") or {}).get("amp", "auto"), device)
    seed = int(config.get("seed", 0))
    cache = open_prompt_cache(prompt_cache)

    records = read_manifests(manifests)
    known = {record.dataset for record in records}
    missing = [name for name in datasets if name not in known]
    if missing:
        raise DataError(f"dataset(s) {missing} are in none of the manifests {[str(m) for m in manifests]}")
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
        held_out = ((config.get("pretrain") or {}).get("exclude_centers") or {}).get(name) or []
        if site not in held_out:
            log.warning("lora.centers.%s: center %s of %s was not held out of pretraining "
                        "(pretrain.exclude_centers), so its zero-shot score is not zero-shot", center, site, name)
    base_sha = sha256_file(model_path)
    base, base_meta = load_model(model_path, expected_sha256=base_sha, device=device)
    # Train and score with the base model's window, whatever the config says now.
    config = with_trained_window(config, base_meta)
    patch = (config.get("pretrain") or {}).get("patch_size", [128, 128, 128])
    sampler = PatchSampler(
        train_cases, patch,
        foreground_ratio=float((config.get("pretrain") or {}).get("foreground_ratio", 0.67)),
        paraphrases=bool((config.get("prompts") or {}).get("paraphrases", True)),
        modalities=modalities_of(base),
    )
    table = TextTable(cache, sampler.all_texts(), device)
    journal = PhaseJournal(out)
    keys = phase_identities(config, center=(*datasets, site), base_sha256=base_sha, train_cases=train_cases,
                            test_cases=test_cases, cache=cache, amp=amp, device=device)
    training = {"steps": int(settings.get("steps", 2000)), "batch_size": int(settings.get("batch_size", 2)),
                "seed": seed, "amp": amp, "num_workers": int((config.get("pretrain") or {}).get("num_workers", 4)),
                "checkpoint_every": int(settings.get("checkpoint_every", 500))}
    results: dict[str, pd.DataFrame] = {}
    runs: dict[str, dict[str, Any]] = {}

    def complete(record: Mapping[str, Any]) -> bool:
        return {"seconds", "rss_mb", "trainable"} <= set(record)

    def evaluate(model: torch.nn.Module, what: str) -> pd.DataFrame:
        log.info("lora %s: scoring the %s model on %d test cases", center, what, len(test_cases))
        return _evaluate(model, test_cases, cache, config)

    def adapt(phase: str, model: torch.nn.Module, lr: float, desc: str) -> None:
        trainable = count_parameters(model, trainable_only=True)
        log.info("%s: %d steps of %d patches at lr %g, %d trainable parameters", desc, training["steps"],
                 training["batch_size"], lr, trainable)
        stats = fit(model, sampler, table, lr=lr, desc=desc, checkpoints=journal.checkpoints(phase, keys[phase]),
                    **training)
        runs[phase] = {**asdict(stats), "trainable": trainable}
        results[phase] = evaluate(model, {"lora": "LoRA-adapted", "full_ft": "fully fine-tuned"}[phase])

    if (done := journal.load("zero_shot", keys["zero_shot"])) is None:
        results["zero_shot"] = evaluate(base, "pretrained (zero-shot)")
        journal.save("zero_shot", keys["zero_shot"], {}, results["zero_shot"])
    else:
        results["zero_shot"] = done[1]

    targets = lora_target_names(base, list(settings.get("targets") or ["encoder", "decoder", "film", "controller"]),
                                bool(settings.get("text_projection", False)),
                                modalities=sorted({case.modality for case in train_cases}))
    lora_config = lora_config_from(settings, targets)
    # The LoRA phase's adapter is kept in the journal until the stage ends: adapter/ is a declared
    # output of the rule, which Snakemake deletes before it reruns a killed or failed job.
    staged = journal.folder / "lora_adapter"
    adapter_file = staged / WEIGHTS_NAME
    done = journal.load("lora", keys["lora"], accept=lambda record: complete(record) and adapter_file.is_file()
                        and sha256_file(adapter_file) == record.get("adapter_sha256"))
    if done is not None:
        runs["lora"], results["lora"] = done
    else:
        adapted = copy.deepcopy(base)
        seed_everything(seed)  # peft draws the LoRA A factors at random: the run's seed decides them
        add_adapter(adapted, lora_config, center)
        adapt("lora", adapted, float(settings.get("lr", 1e-3)), f"lora {center}")
        save_adapter(adapted, center, lora_config, staged, base_sha)
        runs["lora"]["adapter_sha256"] = sha256_file(adapter_file)
        journal.save("lora", keys["lora"], runs["lora"], results["lora"])
        del adapted

    if (done := journal.load("full_ft", keys["full_ft"], accept=complete)) is None:
        tuned = copy.deepcopy(base)
        for param in tuned.parameters():
            param.requires_grad_(True)
        seed_everything(seed)  # the same random stream (dropout) as the LoRA run
        adapt("full_ft", tuned, float(settings.get("full_finetune_lr", 1e-4)), f"full fine-tuning {center}")
        journal.save("full_ft", keys["full_ft"], runs["full_ft"], results["full_ft"])
        del tuned
    else:
        runs["full_ft"], results["full_ft"] = done

    adapter_file = _publish(staged, out / "adapter")
    dice = {run: _mean_dice(frame) for run, frame in results.items()}
    metrics: dict[str, Any] = {
        "center": center,
        "dataset": dataset,
        "datasets": datasets,
        "site": site,
        "zero_shot_dice": dice["zero_shot"],
        "lora_dice": dice["lora"],
        "full_ft_dice": dice["full_ft"],
        "gap_closed": gap_closed(dice["zero_shot"], dice["lora"], dice["full_ft"]),
        "trainable_params_lora": int(runs["lora"]["trainable"]),
        "trainable_params_full": int(runs["full_ft"]["trainable"]),
        "total_params": int(count_parameters(base)),
        "adapter_bytes": adapter_file.stat().st_size,
        "checkpoint_bytes": Path(model_path).stat().st_size,
        "seconds_lora": runs["lora"]["seconds"],
        "seconds_full": runs["full_ft"]["seconds"],
        "peak_rss_mb_lora": runs["lora"]["rss_mb"],
        "peak_rss_mb_full": runs["full_ft"]["rss_mb"],
        "steps": training["steps"],
        "train_cases": len(train_cases),
        "test_cases": len(test_cases),
        "device": str(device),
        "per_class": _per_class(results),
        "per_dataset": {name: {**{run: _mean_dice(frame[frame["dataset"].astype(str) == name])
                                  for run, frame in results.items()},
                               "train_cases": counts[name][0], "test_cases": counts[name][1]} for name in datasets},
        # Phases an earlier, interrupted attempt finished (their seconds and peaks are that attempt's).
        "resumed_phases": list(journal.resumed),
    }
    if device.type == "cuda":
        metrics["peak_cuda_mb_lora"] = runs["lora"].get("cuda_mb")
        metrics["peak_cuda_mb_full"] = runs["full_ft"].get("cuda_mb")
    label_map = {str(k): v for k, v in sorted(train_cases[0].label_map.items())}
    center_classes = list(dict.fromkeys(name for case in train_cases for name in case.classes))
    write_json(out / "adapter_meta.json", {
        "base_sha256": base_sha,
        "base_model": Path(model_path).name,
        "adapter_sha256": runs["lora"]["adapter_sha256"],  # hashed when written, checked when resumed
        "center": center,
        "dataset": dataset,
        "datasets": datasets,
        "site": site,
        "label_map": label_map,
        "classes": center_classes,
        # Classes of the config's own among them, as the base model's sidecar records its (duplus.segment.knowledge).
        "declared_classes": [class_record(info) for info in declared_lineage(center_classes)],
        "target_modules": targets,
        "rank": lora_config.r,
        "alpha": lora_config.lora_alpha,
        "text_encoder": str(getattr(cache, "encoder_identity", "")),
        "metrics": {k: metrics[k] for k in ("zero_shot_dice", "lora_dice", "full_ft_dice", "gap_closed")},
    })
    write_json(out / "metrics.json", metrics)  # last: it is the rule's declared output
    journal.clear()
    log.info("lora %s: dice zero-shot %s, LoRA %s, full %s", center, dice["zero_shot"], dice["lora"], dice["full_ft"])
    return metrics
