"""The manifest: one row per preprocessed case, the contract between preprocessing and every later stage.

Its columns, its writer and its one reader, the case record a row resolves to, and selection of cases.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from duplus.atomic import write_csv
from duplus.errors import DataError

# The columns, in the order preprocessing writes them (docs/architecture.md, "Preprocessed store").
COLUMNS = (
    "dataset",  # the configured dataset's name
    "case",  # case id; also the name of the case's folder beside the manifest
    "center",  # the center that acquired the scan (held out of pretraining, adapted to by LoRA)
    "modality",  # CT, MRI or PET
    "sequence",  # the MRI sequence; empty when the dataset names none
    "region",  # body region, for the context prompt
    "split",  # train or test
    "image",  # float32 (Z, Y, X) array, relative to the manifest's folder, as are the next three
    "label",  # uint8 array of stored label ids
    "meta",  # JSON preprocessing record: original geometry, crop box, normalisation
    "locations",  # .npz of sampled voxel indices per label id
    "shape",  # "ZxYxX" of the arrays
    "labels",  # JSON object: stored label id -> canonical class name
    "raw_image",  # absolute path of the original image
    "raw_label",  # absolute path of the original label (evaluation scores against it)
)


@dataclass(frozen=True)
class CaseRecord:
    """One preprocessed case: where its files are (absolute paths) and what its label ids mean."""

    dataset: str
    case: str
    center: str
    modality: str
    sequence: str | None
    region: str
    split: str
    image: Path
    label: Path
    meta: Path
    locations: Path
    shape: tuple[int, int, int]
    label_map: dict[int, str]  # stored label id -> class, background left out
    raw_image: Path | None
    raw_label: Path | None

    @property
    def classes(self) -> list[str]:
        """Class names this case's dataset annotates, in label-id order, without repeats."""
        return list(dict.fromkeys(self.label_map[label_id] for label_id in sorted(self.label_map)))

    @property
    def where(self) -> str:
        """``dataset/case``, as messages name a case."""
        return f"{self.dataset}/{self.case}"


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):  # None or NaN
        return ""
    return str(value)


def _shape(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 1:
        raise DataError(f"shape '{text}' is not 'ZxYxX'")
    return parts  # type: ignore[return-value]


def _label_map(text: str) -> dict[int, str]:
    try:
        label_map = {int(k): str(v) for k, v in json.loads(text).items()}
    except (TypeError, ValueError, AttributeError) as error:
        raise DataError(f"labels '{text}' is not a JSON object of label id -> class name ({error})") from None
    # Background is never a class, by id or by name.
    label_map = {k: v for k, v in label_map.items() if k != 0 and v != "background"}
    if not label_map:
        raise DataError("labels names no class")
    return label_map


def case_of(row: Mapping[str, Any], folder: str | os.PathLike) -> CaseRecord:
    """The record of one manifest row (as read, or as preprocessing returns it); relative paths start at ``folder``.

    Raises:
        DataError: the row's shape or labels cannot be read (the message names the case).
    """
    root = Path(folder).resolve()
    values = {column: _text(row.get(column)) for column in COLUMNS}
    try:
        shape, label_map = _shape(values["shape"]), _label_map(values["labels"])
    except DataError as error:
        raise DataError(f"case '{values['dataset']}/{values['case']}': {error}") from None
    return CaseRecord(
        dataset=values["dataset"], case=values["case"], center=values["center"], modality=values["modality"],
        sequence=values["sequence"].strip() or None, region=values["region"], split=values["split"],
        image=root / values["image"], label=root / values["label"], meta=root / values["meta"],
        locations=root / values["locations"], shape=shape, label_map=label_map,
        raw_image=Path(values["raw_image"]) if values["raw_image"] else None,
        raw_label=Path(values["raw_label"]) if values["raw_label"] else None,
    )


def write_manifest(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Write the rows' ``COLUMNS`` (other keys are left out) to ``path`` atomically; returns the table written."""
    frame = pd.DataFrame(list(rows))[list(COLUMNS)]
    write_csv(path, frame)
    return frame


def read_manifest(path: str | os.PathLike) -> list[CaseRecord]:
    """Every row of one ``manifest.csv`` as a record, in file order.

    Raises:
        DataError: the file is missing, lacks columns, or rows cannot be read (all such rows named).
    """
    manifest = Path(path)
    if not manifest.is_file():
        raise DataError(f"{manifest}: manifest not found (run the preprocess rule first)")
    # Every value as written: no column is numbers, and an empty sequence must stay empty, not NaN.
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"{manifest}: missing column(s) {missing} (preprocess the dataset again)")
    records, problems = [], []
    for row in frame.to_dict("records"):
        try:
            records.append(case_of(row, manifest.parent))
        except DataError as error:
            problems.append(str(error))
    if problems:
        raise DataError(f"{manifest}: {'; '.join(problems)}")
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
    """Records of one split (None: every split), optionally of some datasets/centers, minus ``exclude_centers``
    ({dataset: centers})."""
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
