"""Atomic file writes: everything is written to a temporary name beside the target, then renamed.

A reader therefore sees either the previous complete file or the new complete file, never a
truncated one, even when the writer is killed (SIGKILL, preemption, disk full).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

# mkstemp creates 0600 files; results on a shared cluster must keep the usual umask-based mode.
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``path`` on success.

    Args:
        path: final destination.
        suffix: suffix of the temporary name (some writers choose the format by suffix);
            defaults to the destination's own suffixes.

    Example:
        >>> with atomic_path("out/model.safetensors") as tmp:
        ...     save_file(tensors, str(tmp))
    """
    target = Path(path)
    if suffix is None:
        suffix = "".join(target.suffixes)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
    except OSError as error:
        raise _naming(error, target) from error
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, _FILE_MODE)
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(error, OSError):
            raise _naming(error, target) from error
        raise


def _naming(error: OSError, target: Path) -> OSError:
    """``error`` naming the output ``target``: a full disk (write, fsync) raises without a file
    name, a refused rename names the hidden temporary file; the user needs the output's path.

    The errno, and with it the subclass (PermissionError, ...), is kept for callers that handle it.
    """
    if error.errno is None or error.filename == str(target):
        return error
    return OSError(error.errno, error.strerror or str(error), str(target))


def _fsync_file(path: Path) -> None:
    if path.is_dir():
        return
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    # A rename is durable only once its folder entry is flushed.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    """Write ``obj`` as JSON (sorted keys, so equal objects give equal bytes) atomically."""
    write_text(path, json.dumps(obj, indent=indent, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Save ``array`` as ``.npy`` atomically (memory-mappable by ``np.load(mmap_mode='r')``)."""
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, np.ascontiguousarray(array), allow_pickle=False)


def save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Save a dict of torch tensors with safetensors, atomically and reproducibly to the byte."""
    from duplus.tensorfile import tensor_bytes

    write_bytes(path, tensor_bytes(tensors, metadata))


def replace_folder(staging: str | os.PathLike, target: str | os.PathLike) -> None:
    """Swap the finished folder ``staging`` in as ``target``: a reader sees the old folder or the new
    one, never a mix (``os.replace`` cannot replace a non-empty folder, so the old one steps aside first)."""
    staging, target = Path(staging), Path(target)
    previous = target.parent / f".{target.name}.old-{os.getpid()}"
    shutil.rmtree(previous, ignore_errors=True)
    if target.exists():
        os.replace(target, previous)
    os.replace(staging, target)
    shutil.rmtree(previous, ignore_errors=True)


def write_csv(path: str | os.PathLike, frame: "pandas.DataFrame", **kwargs: Any) -> None:  # noqa: F821
    """Write a pandas DataFrame as CSV atomically (no index unless asked)."""
    kwargs.setdefault("index", False)
    with atomic_path(path, suffix=".csv") as tmp:
        frame.to_csv(tmp, **kwargs)


@contextlib.contextmanager
def locked_beside(path: str | os.PathLike) -> Iterator[None]:
    """Hold an advisory lock in a file beside ``path`` (``.<name>.lock``) for the block.

    Serialises read-merge-write cycles and downloads of one file across processes. Where no lock
    can be taken (a read-only folder, no ``fcntl``) the block runs unlocked: writes are atomic
    anyway, so the worst case is work done twice.
    """
    path = Path(path)
    handle = None
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path.parent / f".{path.name}.lock", "a")
        fcntl.flock(handle, fcntl.LOCK_EX)
    except (ImportError, OSError):
        if handle is not None:
            handle.close()
        handle = None
    try:
        yield
    finally:
        if handle is not None:
            handle.close()  # closing releases the lock
