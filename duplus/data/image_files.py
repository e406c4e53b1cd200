"""The files one image file is made of: a MetaImage (.mhd) or NRRD (.nhdr) header names its voxel data
file(s) (``ElementDataFile`` / ``data file``); every other format is one file.

A hash of the header alone would not change when the voxels do, so whoever records what a scan
was (the report of `duplus segment`) hashes these files, not just the one given.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from duplus.errors import DataError

# Headers are text and short; a limit keeps a binary file misnamed .mhd from being read whole.
_HEADER_LIMIT = 1 << 20
# "name%03d.raw 1 20 1" (MetaImage) / "slice%03d.raw 1 20 1 2" (NRRD): a printf pattern and a range.
_PATTERN = re.compile(r"^(?P<format>\S*%\d*d\S*)\s+(?P<min>-?\d+)\s+(?P<max>-?\d+)\s+(?P<step>-?\d+)(?:\s+\d+)?$")


def image_files(path: str | os.PathLike) -> list[Path]:
    """``path`` followed by the data files its header names (none for a single-file image), in file order."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".mhd"):
        return [path, *_listed(path, _metaimage_data(path), "ElementDataFile")]
    if name.endswith((".nhdr", ".nrrd")):
        return [path, *_listed(path, _nrrd_data(path), "data file")]
    return [path]


def _header_lines(path: Path) -> list[str]:
    with open(path, "rb") as handle:
        head = handle.read(_HEADER_LIMIT)
    return head.decode("latin-1").splitlines()


def _metaimage_data(path: Path) -> list[str]:
    """Value of ``ElementDataFile`` and, for ``LIST``, the file names after it (MetaIO ends the header there)."""
    lines = _header_lines(path)
    for index, line in enumerate(lines):
        key, _, value = line.partition("=")
        if key.strip().lower() == "elementdatafile":
            value = value.strip()
            if value.upper() == "LOCAL":
                return []
            if value.upper().startswith("LIST"):
                return ["LIST", *(item.strip() for item in lines[index + 1:] if item.strip())]
            return [value]
    raise DataError(f"{path}: MetaImage header has no ElementDataFile line (expected the voxel data's file name)")


def _nrrd_data(path: Path) -> list[str]:
    """Value of ``data file`` (``datafile``) and, for ``LIST``, the names after the header; [] if the data is inline."""
    lines = _header_lines(path)
    for index, line in enumerate(lines):
        if not line.strip():
            break  # a blank line ends the header; inline data follows
        key, sep, value = line.partition(":")
        if sep and not line.startswith("#") and key.strip().lower() in ("data file", "datafile"):
            value = value.strip().lstrip("=").strip()  # "data file:=" is not valid NRRD, but tolerated
            if value.upper().startswith("LIST"):
                return ["LIST", *(item.strip() for item in lines[index + 1:] if item.strip())]
            return [value]
    return []


def _listed(header: Path, entries: list[str], field: str) -> list[Path]:
    if not entries:
        return []
    if entries[0] == "LIST":
        names = entries[1:]
    elif (match := _PATTERN.match(entries[0])) is not None:
        start, stop, step = int(match["min"]), int(match["max"]), int(match["step"])
        if step == 0:
            raise DataError(f"{header}: {field} '{entries[0]}' has a step of 0")
        names = [match["format"] % k for k in range(start, stop + (1 if step > 0 else -1), step)]
    else:
        names = entries
    files = [Path(name) if os.path.isabs(name) else header.parent / name for name in names]
    missing = [str(file) for file in files if not file.is_file()]
    if missing:
        raise DataError(f"{header}: {field} names {', '.join(missing[:3])}, which is not there "
                        "(the header and its voxel data file belong in one folder)")
    return files
