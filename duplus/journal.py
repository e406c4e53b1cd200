"""Resume journals: a folder of keyed records, each vouching for the files a finished piece of work left.

The one mechanism behind every resume of a killed stage (preprocessed cases, evaluated cases, LoRA phases,
training checkpoints).

A long stage records each finished piece of its work (a case, a phase) as ``<folder>/<name>.json``:
the piece's key (``journal_key`` of everything its result depends on), a little JSON data, and the
sha256 of each file the piece wrote into the folder. The caller writes those files first (each
atomically, ``duplus.atomic``) and the record last, so a record exists only for finished work. A
rerun's ``load`` returns the data only when the record is whole, was written under the same name
and key, and every file it lists (and nothing else in a folder it lists) still has the recorded
bytes: a record of an earlier attempt can never vouch for files a later, killed attempt replaced.
Anything else reads as "not done" and the work is done again. The stage ``clear``s the journal
once its outputs are written, so a finished stage never feeds a later one.

Training checkpoints (``duplus.train.checkpoint``) are records of this journal too: their tensors
are a file the record vouches for, given as bytes to ``save`` and read back through ``lookup``, so
that the bytes checked are the bytes parsed.

Written by hand: checkpoint libraries (torch.save, safetensors, orbax) keep tensors, not keyed,
verified records of arbitrary work, and joblib.Memory keys by a function's arguments, which here
are not what the results depend on (file contents, the package's source).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Collection, Iterable, Mapping

from duplus.atomic import write_bytes, write_json
from duplus.hashing import sha256_file, sha256_text

FORMAT = "duplus-journal/1"
ABSENT = "no record"
OTHER_KEY = "recorded under another key"
_WORKSPACE = "key"  # the record inside a workspace folder: <folder>/<name>/key.json


def journal_key(identity: Mapping[str, Any]) -> str:
    """The key of a piece of work: sha256 of what its result depends on, as JSON with sorted keys.

    Values JSON cannot hold are written as ``str(value)``; pass file contents as their sha256, never
    a path alone (a path says nothing of what is in the file).
    """
    return sha256_text(json.dumps(identity, sort_keys=True, default=str))


@dataclass(frozen=True)
class Lookup:
    """What ``Journal.lookup`` found: the record's data when it may be used, else why not."""

    data: dict[str, Any] | None
    reason: str = ""  # ABSENT, OTHER_KEY, or what is wrong with the record or its files
    contents: dict[str, bytes] = field(default_factory=dict)  # the files asked for by ``read``, as verified


class Journal:
    """The records of one stage's finished work in ``folder`` (see the module docstring)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def record_path(self, name: str) -> Path:
        """The record file of ``name``: ``<folder>/<name>.json``."""
        if not name or "/" in name or os.sep in name or name.startswith("."):
            raise ValueError(f"{self.folder}: journal entry name '{name}' is not a plain file name")
        return self.folder / f"{name}.json"

    def lookup(self, name: str, key: str, read: Iterable[str] = ()) -> Lookup:
        """The data recorded for ``name`` if it was recorded under ``key`` and its files verify.

        ``read``: recorded files (relative to the folder) whose bytes come back in ``contents``: each
        is read once, and the bytes hashed are the bytes returned, so a file replaced between the
        check and its use cannot pass.
        """
        path = self.record_path(name)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return Lookup(None, ABSENT)
        except (OSError, ValueError) as error:  # truncated or replaced by something else: never trusted
            return Lookup(None, f"unreadable ({error})")
        if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("name") != name \
                or not isinstance(record.get("data"), dict) or not isinstance(record.get("files"), dict) \
                or not isinstance(record.get("folders"), list):
            return Lookup(None, f"not a {FORMAT} record of '{name}'")
        if record.get("key") != key:
            return Lookup(None, OTHER_KEY)
        wanted = set(read)
        unlisted = sorted(wanted - set(record["files"]))
        if unlisted:
            return Lookup(None, f"does not list {', '.join(unlisted)}")
        contents: dict[str, bytes] = {}
        problem = self._verify(record["files"], record["folders"], wanted, contents)
        return Lookup(None, problem) if problem else Lookup(record["data"], contents=contents)

    def load(self, name: str, key: str) -> dict[str, Any] | None:
        """The data of ``lookup``, or None whatever the reason."""
        return self.lookup(name, key).data

    def save(self, name: str, key: str, data: Mapping[str, Any], files: Iterable[str | Path] = (),
             write: Mapping[str, bytes] | None = None) -> None:
        """Record ``name`` as finished under ``key``: call it after the files it vouches for are written.

        Args:
            name: the piece of work (a plain file name; the record is ``<folder>/<name>.json``).
            key: ``journal_key`` of what the piece's result depends on.
            data: JSON values given back by ``load`` (NaN is kept as NaN).
            files: files or folders in the journal's folder (relative to it, or absolute) that the
                piece wrote; each file's sha256 is recorded, and a folder stands for exactly the
                files it holds now.
            write: files (relative to the folder) to write first, each atomically, from these bytes;
                their sha256 is taken of the bytes, without reading them back.
        """
        hashes: dict[str, str] = {}
        for relative, payload in (write or {}).items():
            parts = PurePosixPath(relative)
            if parts.is_absolute() or ".." in parts.parts:
                raise ValueError(f"{self.folder}: {relative} is outside the journal")
            write_bytes(self.folder / parts, payload)
            hashes[parts.as_posix()] = hashlib.sha256(payload).hexdigest()
        folders: list[str] = []
        for item in files:
            path = Path(item) if Path(item).is_absolute() else self.folder / item
            relative = path.relative_to(self.folder).as_posix()  # ValueError: outside the journal
            if path.is_dir():
                folders.append(relative)
                members = sorted(p for p in path.rglob("*") if p.is_file())
            else:
                members = [path]
            for member in members:
                hashes[member.relative_to(self.folder).as_posix()] = sha256_file(member)
        write_json(self.record_path(name), {"format": FORMAT, "name": name, "key": key, "data": dict(data),
                                            "files": hashes, "folders": folders})

    def discard(self, name: str) -> None:
        """Forget ``name`` (its record only: the caller removes what it wrote)."""
        self.record_path(name).unlink(missing_ok=True)

    def workspace(self, name: str, key: str) -> tuple[Path, bool]:
        """(``<folder>/<name>/``, whether it was emptied): a folder for work in progress under ``key``.

        What a run under the same key left there (training checkpoints) is kept; a folder left by a
        run under another key, or without a record of its key, is emptied first.
        """
        folder = self.folder / name
        inner = Journal(folder)
        if inner.load(_WORKSPACE, key) is not None:
            return folder, False
        emptied = folder.exists()
        if emptied:
            shutil.rmtree(folder)
        inner.save(_WORKSPACE, key, {})
        return folder, emptied

    def clear(self) -> None:
        """Delete the journal and everything in its folder (the stage's outputs hold the results now)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def _verify(self, hashes: Mapping[str, Any], folders: list[Any], read: Collection[str] = frozenset(),
                contents: dict[str, bytes] | None = None) -> str:
        """'' if every recorded file has its recorded bytes and each folder holds just its files.

        The bytes of the files in ``read`` go into ``contents``, hashed from what was read.
        """
        for relative in [*hashes, *folders]:
            parts = PurePosixPath(str(relative))
            if parts.is_absolute() or ".." in parts.parts:
                return f"lists {relative}, outside {self.folder}"
        for relative in folders:
            folder = self.folder / relative
            found = {p.relative_to(self.folder).as_posix() for p in folder.rglob("*") if p.is_file()} \
                if folder.is_dir() else set()
            if found != {name for name in hashes if name.startswith(f"{relative}/")}:
                return f"{relative}/ holds other files than were recorded"
        for relative, digest in hashes.items():
            try:
                if relative in read:
                    payload = (self.folder / relative).read_bytes()
                    actual = hashlib.sha256(payload).hexdigest()
                    if contents is not None:
                        contents[relative] = payload
                else:
                    actual = sha256_file(self.folder / relative)
            except OSError:
                return f"{relative} is missing"
            if actual != digest:
                return f"{relative} has changed since it was recorded"
        return ""
