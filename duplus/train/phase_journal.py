"""Finished phases of a per-center adaptation job, kept beside its outputs so that a killed job resumes.

A LoRA job runs five phases: the zero-shot evaluation, LoRA training and its evaluation, full
fine-tuning and its evaluation. At the paper's size each takes minutes to an hour, and a SLURM
time limit or preemption should cost the phase in progress, not the whole job. ``<out>/.resume/``
holds ``run.json`` (the key of the run), one ``<phase>.json`` per finished phase (its per-case
scores and bookkeeping) and ``<phase>/`` checkpoints of a training in progress. The key covers
everything the numbers depend on (base weights, settings, seed, precision, data, prompts, the
package's source); a folder with another key is discarded. The stage deletes the folder once its
outputs are written, so a finished job never feeds a later one.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd

from duplus.atomic import write_json
from duplus.hashing import sha256_text

log = logging.getLogger(__name__)

FOLDER = ".resume"
FORMAT = "duplus-phase/1"


def _plain(value: Any) -> Any:
    """A JSON value that reads back as the same float (NaN as null, numpy scalars as Python ones)."""
    if isinstance(value, (np.integer, np.floating)):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


class PhaseJournal:
    """The finished phases of one adaptation job in ``out_dir`` (see the module docstring)."""

    def __init__(self, out_dir: str | Path, identity: Mapping[str, Any]) -> None:
        self.folder = Path(out_dir) / FOLDER
        identity = json.loads(json.dumps(identity, sort_keys=True, default=str))
        self.key = sha256_text(json.dumps(identity, sort_keys=True))
        self.resumed: list[str] = []
        run = self.folder / "run.json"
        if self.folder.exists():
            try:
                saved = json.loads(run.read_text(encoding="utf-8")).get("key")
            except (OSError, ValueError, AttributeError):
                saved = None
            if saved != self.key:
                log.warning("%s: left by a run with other settings, base model, data or code; starting over",
                            self.folder)
                shutil.rmtree(self.folder)
        if not run.exists():
            write_json(run, {"format": FORMAT, "key": self.key, "identity": identity})

    def checkpoints(self, phase: str) -> Path:
        """Checkpoint folder of a training phase in progress."""
        return self.folder / phase

    def load(self, phase: str, accept: Callable[[Mapping[str, Any]], bool] | None = None,
             ) -> tuple[dict[str, Any], pd.DataFrame] | None:
        """(bookkeeping, per-case scores) of ``phase`` if an earlier attempt finished it, else None.

        ``accept``: a check of the bookkeeping against files outside the journal (an adapter the
        phase wrote, since deleted or replaced); when it fails the phase is done again.
        """
        path = self.folder / f"{phase}.json"
        if not path.is_file():
            return None
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved.get("format") != FORMAT or saved.get("key") != self.key:
                raise ValueError("written by another run")
            frame = pd.DataFrame(saved["rows"], columns=saved["columns"])
            record = dict(saved["record"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            log.warning("%s: unreadable (%s); doing the %s phase again", path, error, phase)
            return None
        if accept is not None and not accept(record):
            log.warning("%s: what the %s phase wrote has changed since; doing it again", path, phase)
            return None
        self.resumed.append(phase)
        log.info("%s: taken from an earlier attempt (%s)", phase, path)
        return record, frame

    def save(self, phase: str, record: Mapping[str, Any], frame: pd.DataFrame) -> None:
        """Record ``phase`` as finished; its training checkpoints are no longer needed."""
        rows = [[_plain(value) for value in row] for row in frame.itertuples(index=False, name=None)]
        write_json(self.folder / f"{phase}.json", {"format": FORMAT, "key": self.key, "record": dict(record),
                                                   "columns": [str(c) for c in frame.columns], "rows": rows})
        shutil.rmtree(self.checkpoints(phase), ignore_errors=True)

    def clear(self) -> None:
        """Delete the journal (after the job's outputs are written)."""
        shutil.rmtree(self.folder, ignore_errors=True)
