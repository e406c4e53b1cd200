"""Which manifest cases train a model (held-out centers left out), their sampling weights, and their identity.

Only manifest rows are read here (``duplus.data.manifest``); the arrays stay on disk until a patch is cut from them.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping, Sequence

from duplus.data.manifest import CaseRecord, read_manifests, select_cases
from duplus.errors import ConfigError, DataError
from duplus.hashing import sha256_text
from duplus.settings import Settings


def pretraining_cases(config: Mapping[str, Any], manifests: Iterable[str | os.PathLike]) -> list[CaseRecord]:
    """Train-split cases of every manifest, without the centers in ``pretrain.exclude_centers``."""
    exclude = Settings.of(config).pretrain.exclude_centers
    records = read_manifests(manifests)
    known = {r.dataset for r in records}
    for name, centers in exclude.items():
        if name not in known:
            raise ConfigError(f"pretrain.exclude_centers: dataset '{name}' is in no manifest ({sorted(known)})")
        present = {r.center for r in records if r.dataset == name}
        # A misspelt center would hold nothing out, and the "zero-shot" score would not be one.
        unknown = sorted(set(centers) - present)
        if unknown:
            raise ConfigError(f"pretrain.exclude_centers.{name}: center(s) {unknown} not in the dataset "
                              f"(its centers: {sorted(present)})")
    cases = select_cases(records, split="train", exclude_centers=exclude)
    if not cases:
        raise DataError(f"no train-split case left for pretraining in {[str(m) for m in manifests]}")
    return cases


def dataset_weights(config: Mapping[str, Any], datasets: Sequence[str]) -> list[float]:
    """Normalised sampling weight per dataset (``pretrain.dataset_weights``, missing = 1)."""
    given = Settings.of(config).pretrain.dataset_weights
    unknown = sorted(set(given) - set(datasets))
    if unknown:
        raise ConfigError(f"pretrain.dataset_weights: {unknown} are not datasets being trained ({list(datasets)})")
    weights = [float(given.get(name, 1.0)) for name in datasets]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"pretrain.dataset_weights: weights {dict(zip(datasets, weights))} must be >= 0 with a positive sum")
    total = sum(weights)
    return [w / total for w in weights]


def preprocessed_sha256(cases: Iterable[CaseRecord]) -> str:
    """What the training data look like: per case its shape, labels and preprocessing record.

    ``meta.json`` holds the target spacing, crop box and normalisation statistics, so new
    preprocessing settings (spacing, CT window, percentiles, cropping) or new raw data change this
    even when the case names stay; the original-file paths are left out, so a moved project resumes.
    """
    parts = []
    for case in sorted(cases, key=lambda c: (c.dataset, c.case)):
        try:
            meta = json.loads(case.meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = {}
        meta = {k: v for k, v in meta.items() if k not in ("raw_image", "raw_label")} if isinstance(meta, dict) else {}
        parts.append(json.dumps([case.dataset, case.case, list(case.shape), sorted(case.label_map.items()), meta],
                                sort_keys=True, default=str))
    return sha256_text("\n".join(parts))
