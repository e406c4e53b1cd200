"""Evaluation of one model on manifest cases: predict, map back to the original grid, score per class.

The bridge to the data and prompt packages is a handful of small functions, so tests can replace them.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from duplus.data.manifest import CaseRecord
from duplus.errors import DataError, PromptError
from duplus.evaluate import label_grid
from duplus.evaluate.metrics import case_metrics
from duplus.inference.packed import PackedMasks
from duplus.inference.predict import predict_masks
from duplus.settings import Settings

if TYPE_CHECKING:
    from duplus.evaluate.case_journal import CaseJournal, JournalEntry

log = logging.getLogger("duplus.evaluate")

PER_CASE_COLUMNS = ["dataset", "case", "center", "class", "dice", "hd95", "nsd"]


# -- seams to the data and prompt packages ---------------------------------------------------
def context_text(modality: str, region: str, sequence: str | None) -> str:
    from duplus.prompts.templates import context_prompt

    return context_prompt(modality, region, sequence)


def target_text(modality: str, class_name: str, sequence: str | None) -> str:
    from duplus.prompts.templates import target_prompts

    return target_prompts(modality, class_name, sequence)[0]


def restore_mask(masks: PackedMasks, k: int, meta: dict[str, Any]) -> np.ndarray:
    """Class ``k`` of preprocessed-grid masks as a bool array on the original grid (SimpleITK array order)."""
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(masks.restored(k, meta)).astype(bool)


def read_array(path: str | Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """Voxels (array order) and spacing per array axis of an original image or label."""
    import SimpleITK as sitk

    from duplus.data.image_io import read_image

    image = read_image(path)
    return sitk.GetArrayFromImage(image), tuple(reversed(image.GetSpacing()))


def label_masks(label: np.ndarray, label_map: dict[int, str], classes: list[str]) -> np.ndarray:
    from duplus.data.taxonomy import masks_from_label

    return np.asarray(masks_from_label(label, label_map, classes), dtype=bool)


# -- evaluation -------------------------------------------------------------------------------
@dataclass
class Evaluation:
    """Per-class rows plus what efficiency.json and the example files need."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    examples: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    max_classes: int = 1

    def frame(self) -> pd.DataFrame:
        frame = pd.DataFrame(self.rows, columns=PER_CASE_COLUMNS)
        frame.attrs["seconds_per_case"] = list(self.seconds)
        return frame


def evaluate_case(
    model: torch.nn.Module,
    case: CaseRecord,
    prompt_cache: Any,
    config: Mapping[str, Any],
    result: Evaluation,
    keep_example: bool = False,
) -> None:
    """Predict one case, compare in original space, append its per-class rows to ``result``."""
    where = case.where
    label_map, classes = case.label_map, case.classes
    try:
        context = prompt_cache.get(context_text(case.modality, case.region, case.sequence))
        targets = prompt_cache.get_many([target_text(case.modality, c, case.sequence) for c in classes])
    except PromptError as error:
        raise PromptError(f"{where}: {error}") from None
    if not case.image.is_file():
        raise DataError(f"{where}: preprocessed image {case.image} not found")
    if case.raw_label is None:
        raise DataError(f"{where}: the manifest names no original label (raw_label) to score against")
    image = np.load(case.image, mmap_mode="r")
    meta = json.loads(case.meta.read_text(encoding="utf-8"))

    started = time.perf_counter()
    pred_small = predict_masks(model, np.asarray(image, dtype=np.float32), case.modality, context, targets, config,
                               show_progress=False)
    result.seconds.append(time.perf_counter() - started)

    label, label_spacing = read_array(case.raw_label)
    truth = label_masks(label, label_map, classes)
    # Scored on the label's own grid and spacing, which may not be the image's (``duplus.evaluate.label_grid``).
    scoring = label_grid.scoring_meta(meta, label_grid.label_geometry(case.raw_label))
    pred = np.stack([restore_mask(pred_small, k, scoring) for k in range(len(classes))])
    if pred.shape != truth.shape:
        raise DataError(f"{where}: restored prediction {pred.shape[1:]} differs from the raw label grid {truth.shape[1:]}")
    if scoring is not meta:
        pred &= label_grid.image_field_of_view(meta["original"], scoring["original"])
    tolerance = Settings.of(config).evaluate.nsd_tolerance_mm
    scores = case_metrics(pred, truth, label_spacing, classes, tolerance)
    for item in scores:
        result.rows.append({"dataset": case.dataset, "case": case.case, "center": case.center, **item})
    log.info("%s (%s): dice %s", where, case.center, ", ".join(f"{s['class']} {s['dice']:.3f}" for s in scores))
    result.max_classes = max(result.max_classes, len(classes))
    if keep_example:
        if case.raw_image is None:
            raise DataError(f"{where}: the manifest names no original image (raw_image) for the example")
        raw_image, image_spacing = read_array(case.raw_image)
        if scoring is not meta:  # the picture stays on the image's grid: prediction and truth are brought onto it
            pred = np.stack([restore_mask(pred_small, k, meta) for k in range(len(classes))])
            truth = label_masks(label_grid.label_on_image_grid(case.raw_label, meta["original"]), label_map, classes)
        result.examples[case.dataset] = {
            "image": np.asarray(raw_image, dtype=np.float32),
            "pred": pred.astype(np.uint8),
            "truth": truth.astype(np.uint8),
            "classes": np.asarray(classes, dtype=str),
            "spacing": np.asarray(image_spacing, dtype=np.float64),
            "case": np.asarray(case.case),
        }


def evaluate_each(
    model: torch.nn.Module,
    cases: Sequence[CaseRecord],
    prompt_cache: Any,
    config: Mapping[str, Any],
    keep_examples: bool = False,
    journal: "CaseJournal | None" = None,
) -> Evaluation:
    """Evaluate every case in turn; keeps the first case of each dataset as an example if asked.

    With a ``journal`` (``duplus.evaluate.case_journal``), cases it holds under the same key are taken
    from it and each newly finished case is added to it: a killed run resumes.
    """
    from duplus.progress import progress

    result = Evaluation()
    seen: set[str] = set()
    for case in progress(list(cases), desc="evaluate", unit="case"):
        keep_example = keep_examples and case.dataset not in seen
        seen.add(case.dataset)
        key = journal.key(case) if journal is not None else ""
        entry = journal.load(case, key, keep_example) if journal is not None else None
        if entry is None:
            first_row = len(result.rows)
            evaluate_case(model, case, prompt_cache, config, result, keep_example=keep_example)
            entry = _entry_of(result, first_row, case.dataset if keep_example else None)
            if journal is not None:
                journal.save(case, key, entry)
            continue
        result.rows.extend(entry.rows)
        result.seconds.append(entry.seconds)
        result.max_classes = max(result.max_classes, entry.n_classes)
        if entry.example is not None:
            result.examples[case.dataset] = entry.example
    if journal is not None and journal.reused:
        log.info("evaluate: %d of %d cases taken from %s (an interrupted run's)", journal.reused, len(cases),
                 journal.folder)
    return result


def _entry_of(result: Evaluation, first_row: int, example_of: str | None) -> "JournalEntry":
    from duplus.evaluate.case_journal import JournalEntry

    rows = result.rows[first_row:]
    return JournalEntry(rows=rows, seconds=result.seconds[-1], n_classes=len(rows),
                        example=result.examples.get(example_of) if example_of else None)


def evaluate_cases(
    model: torch.nn.Module,
    cases: Sequence[CaseRecord],
    prompt_cache: Any,
    config: Mapping[str, Any],
) -> pd.DataFrame:
    """Per-case, per-class metrics (columns ``dataset, case, center, class, dice, hd95, nsd``).

    Args:
        model: an in-memory DuPLUS (base, LoRA-adapted or fine-tuned) on its device.
        cases: manifest cases (``duplus.data.manifest``).
        prompt_cache: a ``PromptCache`` or the path of one.
    """
    if isinstance(prompt_cache, (str, Path)):
        from duplus.prompts.cache import PromptCache

        prompt_cache = PromptCache.load(prompt_cache)
    return evaluate_each(model, cases, prompt_cache, config).frame()
