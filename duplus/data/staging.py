"""Preprocessed cases staged before they replace the store, kept across a killed run.

Preprocessing a large dataset (AMOS: 600 volumes) takes a while, and a job killed at case 590
should not redo the first 589. Each case is written to ``<store>/.staging/<case>/`` and, once
complete, vouched for by ``<case>.done.json`` beside it: its manifest row and a key of everything
the case's arrays depend on (the raw files' sha256 from the download record, the case's layout,
the preprocessing settings, seed, split, dataset description and the package's source code). A rerun
takes every staged case whose key still matches and preprocesses the rest; the staging folder
goes once the store has been swapped in.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

from duplus.atomic import write_json
from duplus.data.layouts import Case
from duplus.hashing import sha256_text

STAGING = ".staging"
DONE = ".done.json"


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
    return sha256_text(json.dumps({"case": layout, "files": files, "settings": settings}, sort_keys=True, default=str))


def staged_row(staging: Path, case_id: str, key: str | None) -> dict[str, Any] | None:
    """The manifest row of a case a previous run staged completely under the same key, else None."""
    if key is None or not (staging / case_id).is_dir():
        return None
    try:
        record = json.loads((staging / f"{case_id}{DONE}").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != key or not isinstance(record.get("row"), dict):
        return None
    return record["row"]


def clear_case(staging: Path, case_id: str) -> None:
    """Remove what an unfinished or outdated attempt left of one case."""
    (staging / f"{case_id}{DONE}").unlink(missing_ok=True)
    shutil.rmtree(staging / case_id, ignore_errors=True)


def mark_done(staging: Path, case_id: str, key: str | None, row: Mapping[str, Any]) -> None:
    """Vouch for a completely staged case (written after all of its files)."""
    if key is not None:
        write_json(staging / f"{case_id}{DONE}", {"key": key, "row": dict(row)})
