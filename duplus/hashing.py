"""Content hashes used to identify weights, caches and data manifests."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks (bounded memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_files(paths: Sequence[str | os.PathLike]) -> str:
    """Hex sha256 of the files one image is made of.

    One file: its plain ``sha256_file`` (what ``sha256sum`` prints). Several (a .mhd/.nhdr header and
    its data, a DICOM series): sha256 over "<file name> <sha256>" lines in the order given, so a
    changed, added, removed or renamed file changes it, and moving the folder does not.
    """
    files = [Path(p) for p in paths]
    if len(files) == 1:
        return sha256_file(files[0])
    return sha256_text("".join(f"{path.name} {sha256_file(path)}\n" for path in files))


def md5_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex md5 of a file (MSD archives publish md5 sums)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    """Hex sha256 of a UTF-8 string."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_tree(folder: str | os.PathLike) -> str:
    """Hash of every file's relative path and content under ``folder`` (sorted, so stable)."""
    root = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def package_source_sha256() -> str:
    """Hash of the ``duplus`` package's source files.

    Work resumed after a kill (staged preprocessed cases, an evaluation's finished cases) is
    keyed by it: a fix made between the killed run and its rerun must not leave results of the
    old code mixed with those of the new.
    """
    import duplus

    root = Path(duplus.__file__).parent
    return sha256_text("\n".join(f"{path.relative_to(root)}:{sha256_file(path)}" for path in sorted(root.rglob("*.py"))))
