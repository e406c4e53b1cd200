"""Task-specific baselines: the universal network's backbone trained on one dataset, without prompts.

Each baseline sees exactly the cases universal pretraining sees of its dataset (held-out centers
stay held out) and, by default, an equal share of the universal run's steps, so that the report's
"universal vs task-specific" columns compare two models of equal total training cost.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable, Mapping

from duplus.errors import DataError
from duplus.settings import Settings
from duplus.train.cases import pretraining_cases
from duplus.train.pretrain import PretrainSettings, train_network


def baseline_steps(config: Mapping[str, Any], n_datasets: int) -> int:
    """``baseline.steps``, or the universal run's steps shared equally among its datasets."""
    settings = Settings.of(config)  # the schema bounds baseline.steps (>= 1) and baseline.lr (> 0)
    if settings.baseline.steps is not None:
        return settings.baseline.steps
    return max(1, settings.pretrain.steps // max(1, int(n_datasets)))


def baseline_settings(config: Mapping[str, Any], n_datasets: int) -> PretrainSettings:
    """The universal run's settings with the baseline's step count (warm-up scaled alike) and
    ``baseline.lr`` when set."""
    universal = PretrainSettings.from_config(config)
    steps = baseline_steps(config, n_datasets)
    warmup = min(steps - 1, round(universal.warmup_steps * steps / universal.steps)) if steps > 1 else 0
    lr = Settings.of(config).baseline.lr
    # One dataset: dataset weights of the universal run do not apply.
    return dataclasses.replace(universal, steps=steps, warmup_steps=max(0, warmup), dataset_weights=None,
                               lr=universal.lr if lr is None else lr)


def run_baseline(
    config: Mapping[str, Any],
    manifests: Iterable[str | os.PathLike],
    prompt_cache: Any,
    dataset: str,
    out_model: str | os.PathLike,
    out_log: str | os.PathLike,
) -> dict[str, Any]:
    """Train the task-specific baseline of ``dataset``; writes its weights, sidecar and training log.

    Args:
        manifests: every dataset's manifest (the budget is shared among them; held-out centers
            are read from ``pretrain.exclude_centers`` as for the universal run).
        prompt_cache: only used to look up the same texts the universal sampler draws; the
            baseline network ignores them.
    """
    manifests = [str(m) for m in manifests]
    cases = [case for case in pretraining_cases(config, manifests) if case.dataset == dataset]
    if not cases:
        raise DataError(f"baseline {dataset}: no train-split case of this dataset in {manifests}")
    settings = baseline_settings(config, len(manifests))
    return train_network(config, settings, cases, prompt_cache, out_model, out_log, task_specific=True)
