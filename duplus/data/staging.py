"""Preprocessed cases staged before they replace the store, kept across a killed run.

Preprocessing a large dataset (AMOS: 600 volumes) takes a while, and a job killed at case 590
should not redo the first 589. Each case is written to ``<store>/.staging/<case>/`` and, once
complete, vouched for by the record ``<case>.json`` beside it (``duplus.journal``: the sha256 of
every file in the case's folder, its manifest row and a key of everything the case's arrays depend
on: the raw files' sha256 from the download record, the case's layout, the preprocessing settings,
seed, split, dataset description and the package's source code). A rerun takes every staged case
whose key still matches and whose files verify, and preprocesses the rest; the staging folder goes
once the store has been swapped in.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

from duplus.data.layouts import Case
from duplus.journal import Journal, journal_key

STAGING = ".staging"


def raw_file_hashes(record: Mapping[str, Any]) -> dict[str, str]:
    """{real path: sha256} of every raw file a download record lists (hashed once, at download)."""
    base = Path(str(record.get("root", "")))
    if record.get("kind") == "csv" or base.is_file():
        base = base.parent  # a CSV dataset's files are recorded relative to the CSV's folder
    hashes = {}
    for name, digest in (record.get("files") or {}).items():
        path = Path(name) if Path(name).is_absolute() else base / name
        hashes[os.path.realpath(path)] = str(digest)
    return hashes


def _file_part(path: Path | None, hashes: Mapping[str, str]) -> Any:
    if path is None:
        return None
    real = os.path.realpath(path)
    if real in hashes:
        return hashes[real]
    inside = real + os.sep  # a folder (DICOM series, PNG stack): every recorded file under it
    files = sorted((name[len(inside):], digest) for name, digest in hashes.items() if name.startswith(inside))
    return files or False


def case_key(case: Case, hashes: Mapping[str, str], settings: Mapping[str, Any]) -> str | None:
    """What a staged case depends on, hashed; None when a raw file is not in the download record
    (then the case is always preprocessed afresh)."""
    files = [_file_part(case.image, hashes), _file_part(case.label, hashes)]
    if any(part is False for part in files):
        return None
    layout = {name: str(value) for name, value in asdict(case).items()}
    return journal_key({"case": layout, "files": files, "settings": settings})


def staged_row(staging: Path, case_id: str, key: str | None) -> dict[str, Any] | None:
    """The manifest row of a case a previous run staged completely under the same key, else None."""
    if key is None:
        return None
    record = Journal(staging).load(case_id, key)
    row = record.get("row") if record is not None else None
    return row if isinstance(row, dict) else None


def clear_case(staging: Path, case_id: str) -> None:
    """Remove what an unfinished or outdated attempt left of one case."""
    Journal(staging).discard(case_id)
    shutil.rmtree(staging / case_id, ignore_errors=True)


def mark_done(staging: Path, case_id: str, key: str | None, row: Mapping[str, Any]) -> None:
    """Vouch for a completely staged case (after all of its files are written)."""
    if key is not None:
        Journal(staging).save(case_id, key, {"row": dict(row)}, files=[case_id])
