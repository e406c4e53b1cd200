"""The evaluate stage: the universal model on every dataset's test cases, in original image space.

Writes per_case.csv, summary.csv, efficiency.json and examples/{dataset}.npz (docs/architecture.md).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from duplus.atomic import atomic_path, write_csv, write_json
from duplus.data.manifest import CaseRecord, read_manifests, select_cases
from duplus.errors import DataError, ModelError
from duplus.evaluate.case_journal import CaseJournal
from duplus.evaluate.case_scores import PER_CASE_COLUMNS, Evaluation, evaluate_cases, evaluate_each
from duplus.inference.predict import autocast_for, inference_settings, model_device
from duplus.settings import Settings
from duplus.tracked import results_only

log = logging.getLogger("duplus.evaluate")

__all__ = ["run_evaluate", "evaluate_cases", "cases_to_evaluate", "summarize", "class_scaling_ratio"]

SUMMARY_COLUMNS = ["dataset", "class", "dice", "hd95", "nsd", "n", "hd95_n"]


def cases_to_evaluate(cases: Sequence[CaseRecord], config: Mapping[str, Any]) -> list[CaseRecord]:
    """Cases of ``evaluate.split`` (every center, excluded ones too), capped per dataset, ordered by dataset and case.

    A cap takes the same number of cases from every center in turn (each center's in an order
    drawn from the seed), so a cap never keeps the centers whose case ids sort first.
    """
    settings = Settings.of(config)
    split, cap = settings.evaluate.split, settings.evaluate.max_cases_per_dataset
    chosen = sorted(select_cases(cases, split=split), key=lambda c: (c.dataset, c.case))
    if cap > 0:
        seed = settings.seed
        datasets = sorted({c.dataset for c in chosen})
        chosen = sorted((kept for name in datasets for kept in _spread_over_centers(
            [c for c in chosen if c.dataset == name], cap, seed)), key=lambda c: (c.dataset, c.case))
    if not chosen:
        raise DataError(f"evaluate: no case has split '{split}' in the manifests (evaluate.split)")
    return chosen


def _spread_over_centers(cases: list[CaseRecord], cap: int, seed: int) -> list[CaseRecord]:
    """``cap`` of one dataset's cases: in rounds of one case per center, each center's in seeded random order."""
    from duplus.hashing import sha256_text

    drawn = sorted(((sha256_text(f"{seed}|{c.dataset}|{c.case}"), c) for c in cases), key=lambda item: item[0])
    turns: dict[str, int] = {}
    order = []
    for draw, case in drawn:
        turn = turns.get(case.center, 0)  # the k-th case of its center
        turns[case.center] = turn + 1
        order.append((turn, draw, case))
    return [case for _, _, case in sorted(order, key=lambda item: item[:2])][:cap]


def summarize(per_case: pd.DataFrame) -> pd.DataFrame:
    """Mean per (dataset, class) ignoring NaN hd95, plus a 'mean' row per dataset (mean over classes).

    ``n``: cases evaluated. ``hd95_n``: cases with a finite HD95: both masks non-empty, or both empty
    (0 mm by the convention of ``duplus.evaluate.metrics``, so a case without the structure that the
    model rightly leaves empty counts, at 0 mm); a structure the model misses or invents has none, so
    its HD95 mean covers fewer cases; compare the two. On a dataset's mean row ``hd95_n`` counts the
    classes its HD95 mean covers.
    """
    rows = []
    for dataset, part in per_case.groupby("dataset", sort=True):
        classes = []
        for name, cls in part.groupby("class", sort=False):
            row = {"dataset": dataset, "class": name, "n": int(len(cls)),
                   "hd95_n": int(pd.to_numeric(cls["hd95"], errors="coerce").notna().sum())}
            row.update({m: float(np.nanmean(cls[m])) if cls[m].notna().any() else float("nan")
                        for m in ("dice", "hd95", "nsd")})
            classes.append(row)
        rows.extend(classes)
        table = pd.DataFrame(classes)
        mean = {"dataset": dataset, "class": "mean", "n": int(part["case"].nunique()),
                "hd95_n": int(table["hd95"].notna().sum())}
        mean.update({m: float(np.nanmean(table[m])) if table[m].notna().any() else float("nan")
                     for m in ("dice", "hd95", "nsd")})
        rows.append(mean)
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def class_scaling_ratio(model: torch.nn.Module, config: Mapping[str, Any], n_classes: int, repeats: int = 2) -> float:
    """Time of one window batch with K = max(8, n_classes) prompts divided by its time with 1 prompt."""
    settings = inference_settings(config)
    device = model_device(model)
    text_dim = _config_of(model).text_dim
    batch = settings["sw_batch_size"]
    generator = torch.Generator().manual_seed(0)
    image = torch.randn((batch, 1, *settings["roi"]), generator=generator).to(device)
    modality = torch.zeros(batch, dtype=torch.long, device=device)
    context = torch.randn((batch, text_dim), generator=generator).to(device)

    def timed(k: int) -> float:
        targets = torch.randn((k, text_dim), generator=generator).to(device)
        best = float("inf")
        for _ in range(repeats + 1):  # the first run warms up kernels and allocator
            _sync(device)
            start = time.perf_counter()
            with torch.no_grad(), autocast_for(device):
                model(image, modality, context, targets)
            _sync(device)
            best = min(best, time.perf_counter() - start)
        return best

    was_training = model.training
    model.eval()
    try:
        one = timed(1)
        many = timed(max(8, int(n_classes)))
    finally:
        model.train(was_training)
    return many / one


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _config_of(model: torch.nn.Module):
    from duplus.model import DuPLUS

    for module in model.modules():
        if isinstance(module, DuPLUS):
            return module.cfg
    raise ModelError(f"{type(model).__name__} contains no DuPLUS network")


def efficiency_report(model: torch.nn.Module, config: Mapping[str, Any], result: Evaluation) -> dict[str, Any]:
    from duplus.model import efficiency
    from duplus.runtime import peak_rss_mb

    settings = inference_settings(config)
    device = model_device(model)
    report = dict(efficiency(model, settings["roi"]))
    report.update(
        seconds_per_volume=float(np.mean(result.seconds)) if result.seconds else float("nan"),
        class_scaling_ratio=class_scaling_ratio(model, config, result.max_classes),
        class_scaling_k=max(8, result.max_classes),
        peak_rss_mb=peak_rss_mb(),
        device=str(device) if device.type != "cuda" else f"{device} ({torch.cuda.get_device_name(device)})",
    )
    if device.type == "cuda":
        report["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return report


def write_examples(out_dir: Path, examples: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    (out_dir / "examples").mkdir(parents=True, exist_ok=True)  # a declared output, even with no example
    for dataset, arrays in examples.items():
        with atomic_path(out_dir / "examples" / f"{dataset}.npz", suffix=".npz") as tmp:
            np.savez_compressed(tmp, **arrays)


def run_evaluate(config: Mapping[str, Any], manifests: Sequence[str], prompt_cache: str, model_path: str,
                 out_dir: str) -> pd.DataFrame:
    """Evaluate ``model_path`` on the configured split of ``manifests``; returns the per-case frame."""
    from duplus.model import load_model, with_trained_window
    from duplus.prompts.cache import PromptCache
    from duplus.runtime import device_for

    out = Path(out_dir)
    device = device_for(config)
    model, sidecar = load_model(model_path, device=device)
    config = with_trained_window(config, sidecar)
    cache = PromptCache.load(prompt_cache)
    if cache.dim != model.cfg.text_dim:
        raise ModelError(
            f"{prompt_cache}: prompt embeddings have dim {cache.dim} but {model_path} was trained with "
            f"{model.cfg.text_dim} (encoder {sidecar.get('text_encoder')}); rebuild the cache with that encoder"
        )
    cases = cases_to_evaluate(read_manifests(manifests), config)
    log.info("evaluating %d cases of %d datasets on %s", len(cases), len({c.dataset for c in cases}), device)
    journal = case_journal(out, sidecar, config, device, prompt_cache)
    result = evaluate_each(model, cases, cache, config, keep_examples=True, journal=journal)
    per_case = result.frame()[PER_CASE_COLUMNS]
    write_csv(out / "per_case.csv", per_case)
    write_csv(out / "summary.csv", summarize(per_case))
    write_examples(out, result.examples)
    write_json(out / "efficiency.json", {**efficiency_report(model, config, result), "cases_resumed": journal.reused})
    journal.clear()
    return per_case


def case_journal(out_dir: Path, sidecar: Mapping[str, Any], config: Mapping[str, Any],
                 device: torch.device, prompt_cache: str) -> CaseJournal:
    """The resume journal of one model's evaluation in ``out_dir`` (``duplus.evaluate.case_journal``)."""
    from duplus.hashing import package_source_sha256, sha256_file

    settings = {**journal_settings(config), "device": device.type, "source": package_source_sha256(),
                "prompt_cache": sha256_file(prompt_cache) if Path(prompt_cache).is_file() else str(prompt_cache)}
    return CaseJournal(out_dir, str(sidecar["sha256"]), settings)


def journal_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The inference and evaluation settings a case's numbers depend on (``duplus.tracked`` lists the others)."""
    return {"inference": results_only("inference", inference_settings(config)),
            "evaluate": results_only("evaluate", config.get("evaluate"), per_case=True)}


def run_evaluate_baselines(config: Mapping[str, Any], manifests: Sequence[str], prompt_cache: str,
                           model_paths: Sequence[str], out_dir: str) -> pd.DataFrame:
    """Evaluate each task-specific baseline on its own dataset's cases; one per_case/summary for all.

    The dataset of a baseline is the one its sidecar names; cases are chosen exactly as for the
    universal model, so the two summaries compare like with like.
    """
    from duplus.model import load_model, with_trained_window
    from duplus.model.task_specific import ARCHITECTURE
    from duplus.prompts.cache import PromptCache
    from duplus.runtime import device_for

    device = device_for(config)
    cache = PromptCache.load(prompt_cache)
    cases = cases_to_evaluate(read_manifests(manifests), config)
    out = Path(out_dir)
    frames, journals = [], []
    for path in model_paths:
        model, sidecar = load_model(path, device=device, architectures=(ARCHITECTURE,))
        datasets = list(sidecar.get("datasets") or [])
        if len(datasets) != 1:
            raise ModelError(f"{path}: a baseline's sidecar names one dataset, found {datasets}")
        mine = [case for case in cases if case.dataset == datasets[0]]
        if not mine:
            raise DataError(f"{path}: no '{Settings.of(config).evaluate.split}' case of {datasets[0]} to evaluate")
        log.info("baseline %s: %d cases", datasets[0], len(mine))
        trained = with_trained_window(config, sidecar)
        journals.append(case_journal(out, sidecar, trained, device, prompt_cache))
        frames.append(evaluate_each(model, mine, cache, trained, journal=journals[-1]).frame()[PER_CASE_COLUMNS])
    if not frames:
        raise ModelError("baseline_evaluate: no baseline model given")
    per_case = pd.concat(frames, ignore_index=True)
    write_csv(out / "per_case.csv", per_case)
    write_csv(out / "summary.csv", summarize(per_case))
    for journal in journals:
        journal.clear()
    return per_case
