"""Per-case results of an evaluation kept beside its outputs, so that a killed job resumes.

Evaluating the paper's test split means hundreds of full volumes, each predicted and then scored
in its original space (HD95 and NSD on millions of voxels): hours of work. Every finished case is
recorded in ``<out>/.cases/`` (a ``duplus.journal.Journal``: its rows, and the example arrays it
kept with their sha256); a rerun after a kill, preemption or time limit takes
the cases whose key still matches and evaluates only the rest. The key covers everything a
case's numbers depend on: the model weights' sha256, the inference and evaluation settings
(``duplus.evaluate.evaluate_stage.journal_settings``), the device kind, the prompt cache, the package's
source code, what the manifest says of the case and the sha256 of the preprocessed image, its
geometry record and the raw label. The stage deletes the journal once its outputs are written, so
a completed evaluation never feeds a later one.
"""

from __future__ import annotations

import json
import logging
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from duplus.atomic import atomic_path
from duplus.data.manifest import CaseRecord
from duplus.hashing import sha256_file, sha256_text
from duplus.journal import Journal, journal_key

log = logging.getLogger("duplus.evaluate")

FOLDER = ".cases"


@dataclass
class JournalEntry:
    """One evaluated case: its per-class rows, its inference seconds, and its example arrays if kept."""

    rows: list[dict[str, Any]]
    seconds: float
    n_classes: int
    example: dict[str, np.ndarray] | None = None


def _plain(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return None  # NaN (HD95 of an empty mask) travels as null
    if isinstance(value, (np.floating, np.integer)):
        return _plain(value.item())
    return value


def _float(value: Any) -> float:
    return float("nan") if value is None else float(value)


class CaseJournal:
    """The finished cases of one evaluation of one model (see the module docstring)."""

    def __init__(self, out_dir: str | Path, model_key: str, settings: Mapping[str, Any]) -> None:
        self.folder = Path(out_dir) / FOLDER
        self._journal = Journal(self.folder)
        self._base = {"model": model_key, "settings": json.loads(json.dumps(settings, sort_keys=True, default=str))}
        self.reused = 0

    def _stem(self, case: CaseRecord) -> str:
        name = f"{case.dataset}__{case.case}"
        return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") + "-" + sha256_text(name)[:8]

    def key(self, case: CaseRecord) -> str:
        """What this case's numbers depend on, hashed (files by content, not by name or time)."""
        fields = {"dataset": case.dataset, "case": case.case, "center": case.center, "modality": case.modality,
                  "region": case.region, "sequence": case.sequence, "labels": sorted(case.label_map.items())}
        files = {name: sha256_file(path) if path is not None and path.is_file() else None
                 for name, path in (("image", case.image), ("meta", case.meta), ("raw_label", case.raw_label))}
        return journal_key({**self._base, "row": fields, "files": files})

    def load(self, case: CaseRecord, key: str, need_example: bool) -> JournalEntry | None:
        """The case's saved results if their key matches (and the example is there when needed)."""
        record = self._journal.load(self._stem(case), key)
        if record is None:
            return None  # absent, unreadable, of another key or with a changed example: evaluate it again
        try:
            rows = [{k: _float(v) if k in ("dice", "hd95", "nsd") else v for k, v in r.items()} for r in record["rows"]]
            example = None
            if need_example:
                if record["example"] is None:
                    return None  # evaluated when it was not the dataset's example
                # The journal has checked the file's sha256 against the record's.
                with np.load(self.folder / record["example"], allow_pickle=False) as arrays:
                    example = {name: arrays[name] for name in arrays.files}
            entry = JournalEntry(rows, float(record["seconds"]), int(record["n_classes"]), example)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError, zipfile.BadZipFile):
            return None  # a record of another layout: evaluate the case again
        self.reused += 1
        return entry

    def save(self, case: CaseRecord, key: str, entry: JournalEntry) -> None:
        """Record a finished case: the example first, then the record that vouches for it."""
        stem = self._stem(case)
        example = None
        if entry.example is not None:
            example = f"{stem}.npz"
            with atomic_path(self.folder / example, suffix=".npz") as tmp:
                np.savez(tmp, **entry.example)
        self._journal.save(stem, key, {
            "dataset": case.dataset, "case": case.case,
            "rows": [{k: _plain(v) for k, v in r.items()} for r in entry.rows],
            "seconds": entry.seconds, "n_classes": entry.n_classes, "example": example,
        }, files=[example] if example else [])

    def clear(self) -> None:
        """Delete the journal (the stage's outputs hold everything now)."""
        self._journal.clear()
