"""Finished phases of a per-center adaptation job, kept beside its outputs so that a killed job resumes.

A LoRA job runs five phases: the zero-shot evaluation, LoRA training and its evaluation, full
fine-tuning and its evaluation. At the paper's size each takes minutes to an hour, and a SLURM
time limit or preemption should cost the phase in progress, not the whole job. ``<out>/.resume/``
(a ``duplus.journal.Journal``) holds one ``<phase>.json`` record per finished phase (its per-case
scores and bookkeeping) and ``<phase>/`` checkpoints of a training in progress (a workspace of the
journal), each with the key of what the phase depends on (base weights, its settings, seed,
precision, the data's bytes, prompts, the package's source); a record or checkpoint folder with
another key is not used. The stage deletes the folder once its
outputs are written, so a finished job never feeds a later one.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import pandas as pd

from duplus.journal import ABSENT, OTHER_KEY, Journal, journal_key

log = logging.getLogger(__name__)

FOLDER = ".resume"


def _plain(value: Any) -> Any:
    """A JSON value that reads back as the same float (NaN as null, numpy scalars as Python ones)."""
    if isinstance(value, (np.integer, np.floating)):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


class PhaseJournal:
    """The finished phases of one adaptation job in ``out_dir`` (see the module docstring).

    Every phase has its own key, of what that phase's numbers depend on: a new full fine-tuning
    learning rate redoes full fine-tuning but keeps the zero-shot scores and the LoRA phase.
    """

    def __init__(self, out_dir: str | Path) -> None:
        self.folder = Path(out_dir) / FOLDER
        self._journal = Journal(self.folder)
        self.resumed: list[str] = []

    @staticmethod
    def key(identity: Mapping[str, Any]) -> str:
        """The hash of what a phase depends on."""
        return journal_key(identity)

    def checkpoints(self, phase: str, identity: Mapping[str, Any]) -> Path:
        """Checkpoint folder of a training phase, emptied first if a run with another key left it."""
        folder, emptied = self._journal.workspace(phase, self.key(identity))
        if emptied:
            log.warning("%s: checkpoints of a run with other settings, base model, data or code; starting "
                        "the %s phase over", folder, phase)
        return folder

    def load(self, phase: str, identity: Mapping[str, Any], accept: Callable[[Mapping[str, Any]], bool] | None = None,
             ) -> tuple[dict[str, Any], pd.DataFrame] | None:
        """(bookkeeping, per-case scores) of ``phase`` if an attempt with the same key finished it, else None.

        ``accept``: a check of the bookkeeping (its fields, files the phase wrote outside the
        journal, since deleted or replaced); when it fails the phase is done again.
        """
        path = self._journal.record_path(phase)
        found = self._journal.lookup(phase, self.key(identity))
        if found.reason == OTHER_KEY:
            log.warning("%s: finished by a run with other settings, base model, data or code; doing the %s "
                        "phase again", path, phase)
            return None
        if found.data is None:
            if found.reason != ABSENT:
                log.warning("%s: %s; doing the %s phase again", path, found.reason, phase)
            return None
        try:
            frame = pd.DataFrame(found.data["rows"], columns=found.data["columns"])
            record = dict(found.data["record"])
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            log.warning("%s: unreadable (%s); doing the %s phase again", path, error, phase)
            return None
        if accept is not None and not accept(record):
            log.warning("%s: incomplete, or what the %s phase wrote has changed since; doing it again", path, phase)
            return None
        self.resumed.append(phase)
        log.info("%s: taken from an earlier attempt (%s)", phase, path)
        return record, frame

    def save(self, phase: str, identity: Mapping[str, Any], record: Mapping[str, Any], frame: pd.DataFrame,
             files: Iterable[str | Path] = ()) -> None:
        """Record ``phase`` as finished (``files``: what it wrote into the journal's folder, checked when
        resumed); its training checkpoints are no longer needed."""
        rows = [[_plain(value) for value in row] for row in frame.itertuples(index=False, name=None)]
        self._journal.save(phase, self.key(identity), {"record": dict(record), "columns": [str(c) for c in frame.columns],
                                                       "rows": rows}, files=files)
        shutil.rmtree(self.folder / phase, ignore_errors=True)

    def clear(self) -> None:
        """Delete the journal (after the job's outputs are written)."""
        self._journal.clear()
