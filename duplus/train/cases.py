"""Training cases read from preprocessed-store manifests: selection by split, dataset and center.

Only manifest rows are read here; the arrays stay on disk until a patch is cut from them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from duplus.errors import ConfigError, DataError
from duplus.hashing import sha256_text

REQUIRED_COLUMNS = ("dataset", "case", "center", "modality", "sequence", "region", "split", "image", "label", "locations",
                    "shape", "labels")


@dataclass(frozen=True)
class CaseRecord:
    """One preprocessed case: where its arrays are and what its label ids mean."""

    dataset: str
    case: str
    center: str
    modality: str
    sequence: str | None
    region: str
    split: str
    image: Path
    label: Path
    locations: Path
    shape: tuple[int, int, int]
    label_map: dict[int, str]

    @property
    def classes(self) -> list[str]:
        """Class names this case's dataset annotates, in label-id order, without repeats."""
        seen: list[str] = []
        for label_id in sorted(self.label_map):
            if self.label_map[label_id] not in seen:
                seen.append(self.label_map[label_id])
        return seen


def _parse_shape(text: str, where: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(v) for v in str(text).lower().split("x"))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 1:
        raise DataError(f"{where}: shape '{text}' is not 'ZxYxX'")
    return parts  # type: ignore[return-value]


def _parse_labels(text: str, where: str) -> dict[int, str]:
    try:
        raw = json.loads(text)
        label_map = {int(k): str(v) for k, v in raw.items()}
    except (TypeError, ValueError, AttributeError) as error:
        raise DataError(f"{where}: labels '{text}' is not a JSON object of label id -> class name ({error})") from error
    label_map.pop(0, None)  # background never is a class
    if not label_map:
        raise DataError(f"{where}: labels names no class")
    return label_map


def _optional(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and value != value) or str(value).strip() == "":
        return None
    return str(value)


def read_manifest(path: str | os.PathLike) -> list[CaseRecord]:
    """All rows of one ``manifest.csv`` as records with absolute array paths."""
    manifest = Path(path)
    if not manifest.is_file():
        raise DataError(f"{manifest}: manifest not found (run the preprocess rule first)")
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"{manifest}: missing columns {missing}")
    root = manifest.parent
    records = []
    for row in frame.to_dict("records"):
        where = f"{manifest} case '{row['case']}'"
        records.append(
            CaseRecord(
                dataset=row["dataset"],
                case=row["case"],
                center=row["center"],
                modality=row["modality"],
                sequence=_optional(row["sequence"]),
                region=row["region"],
                split=row["split"],
                image=root / row["image"],
                label=root / row["label"],
                locations=root / row["locations"],
                shape=_parse_shape(row["shape"], where),
                label_map=_parse_labels(row["labels"], where),
            )
        )
    return records


def read_manifests(paths: Iterable[str | os.PathLike]) -> list[CaseRecord]:
    """Records of several manifests, in the given order."""
    records: list[CaseRecord] = []
    for path in paths:
        records.extend(read_manifest(path))
    return records


def select_cases(
    records: Sequence[CaseRecord],
    split: str | None = "train",
    datasets: Iterable[str] | None = None,
    centers: Iterable[str] | None = None,
    exclude_centers: Mapping[str, Iterable[str]] | None = None,
) -> list[CaseRecord]:
    """Records of one split, optionally restricted to datasets/centers, minus held-out centers."""
    wanted_datasets = set(datasets) if datasets is not None else None
    wanted_centers = set(centers) if centers is not None else None
    excluded = {name: set(values) for name, values in (exclude_centers or {}).items()}
    chosen = []
    for record in records:
        if split is not None and record.split != split:
            continue
        if wanted_datasets is not None and record.dataset not in wanted_datasets:
            continue
        if wanted_centers is not None and record.center not in wanted_centers:
            continue
        if record.center in excluded.get(record.dataset, ()):
            continue
        chosen.append(record)
    return chosen


def pretraining_cases(config: Mapping[str, Any], manifests: Iterable[str | os.PathLike]) -> list[CaseRecord]:
    """Train-split cases of every manifest, without the centers in ``pretrain.exclude_centers``."""
    pretrain = config.get("pretrain", {}) or {}
    exclude = pretrain.get("exclude_centers", {}) or {}
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
    given = (config.get("pretrain", {}) or {}).get("dataset_weights", {}) or {}
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
            meta = json.loads((Path(case.image).parent / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = {}
        meta = {k: v for k, v in meta.items() if k not in ("raw_image", "raw_label")} if isinstance(meta, dict) else {}
        parts.append(json.dumps([case.dataset, case.case, list(case.shape), sorted(case.label_map.items()), meta],
                                sort_keys=True, default=str))
    return sha256_text("\n".join(parts))
