"""Atomic outputs: a writer killed at any instant leaves the previous complete file or the new one.

Expectation "atomic-write": for every helper of ``duplus.atomic``, a SIGKILL while the data is being
written, between the write and the rename, or right after the rename leaves a reader with either
the previous complete file or the new complete file, never a truncated one.

Expectation "atomicity-is-load-bearing" (meta-tests): the same checks FAIL once ``atomic_path`` is
replaced by a plain writer that writes straight to the final name; so the checks above, and the
kill tests of test_kill_resume.py (which repeat this on a real stage), would notice if the
guarantee were removed.

The crash is real: the writer runs in a forked child that SIGKILLs itself (no ``finally`` block,
no clean-up handler runs), and the parent reads what is on disk afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import pytest
import torch
from reliability_helpers import check_readable, check_tree_readable
from safetensors.torch import load_file as load_safetensors

import duplus.atomic as atomic

OLD = {"version": "old", "values": list(range(200))}
NEW = {"version": "new", "values": list(range(1000, 1400))}


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def run_and_die(action: Callable[[], None]) -> int:
    """Run ``action`` in a forked child; returns the child's wait status (it should die of SIGKILL)."""
    pid = os.fork()
    if pid == 0:  # child: only file I/O here, then a hard exit whatever happens
        try:
            action()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return status


@contextlib.contextmanager
def crash_at(moment: str) -> Iterator[None]:
    """In the (child) process: SIGKILL at ``moment`` of the next atomic write.

    mid-write: half of the data is on disk under the temporary name;
    before-rename: all data written and flushed, rename not done;
    after-rename: renamed, the folder entry not yet fsynced.
    """
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        if moment == "mid-write":
            os.truncate(src, os.path.getsize(src) // 2)
            _die()
        if moment == "before-rename":
            _die()
        real_replace(src, dst)
        if moment == "after-rename":
            _die()

    os.replace = replace  # type: ignore[assignment] - only ever done in a child that is about to die
    try:
        yield
    finally:
        os.replace = real_replace  # type: ignore[assignment]


@contextlib.contextmanager
def non_atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """What a writer without ``duplus.atomic`` does: write to the final name; here it dies half-way."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    yield target
    os.truncate(target, target.stat().st_size // 2)
    _die()


# Each helper with: write(path, payload), read(path) -> comparable value, old payload, new payload.
def _frame(tag: str) -> pd.DataFrame:
    return pd.DataFrame({"step": range(300), "loss": np.linspace(0, 1, 300), "tag": tag})


HELPERS: dict[str, tuple[str, Callable[[Path, Any], None], Callable[[Path], Any], Any, Any]] = {
    "write_json": ("out.json", atomic.write_json, lambda p: json.loads(p.read_text(encoding="utf-8")), OLD, NEW),
    "write_text": ("out.txt", atomic.write_text, lambda p: p.read_text(encoding="utf-8"), "old\n" * 500, "new line\n" * 700),
    "write_bytes": ("out.bin", atomic.write_bytes, lambda p: p.read_bytes(), b"o" * 5000, b"n" * 9000),
    "save_npy": ("out.npy", atomic.save_npy, lambda p: np.load(p, allow_pickle=False).tolist(),
                 np.arange(3000, dtype=np.float32), np.ones((40, 50), dtype=np.float64)),
    "write_csv": ("out.csv", atomic.write_csv, lambda p: pd.read_csv(p).to_dict("list"), _frame("old"), _frame("new")),
    "save_safetensors": ("out.safetensors", atomic.save_safetensors,
                         lambda p: {k: v.tolist() for k, v in load_safetensors(str(p)).items()},
                         {"w": torch.zeros(500)}, {"w": torch.ones(800), "b": torch.arange(7.0)}),
}


def assert_previous_or_new(path: Path, read: Callable[[Path], Any], old: Any, new: Any) -> None:
    """The guarantee itself: the reader gets the old value or the new one, and nothing else."""
    try:
        value = read(path)
    except Exception as error:  # noqa: BLE001 - a reader failing on a final name is the bug we look for
        raise AssertionError(f"{path}: unreadable after a killed write ({type(error).__name__}: {error})") from None
    assert value in (old, new), f"{path}: holds neither the previous nor the new content"


@pytest.mark.parametrize("moment", ["mid-write", "before-rename", "after-rename"])
@pytest.mark.parametrize("helper", sorted(HELPERS))
def test_killed_write_leaves_previous_or_new_file(helper: str, moment: str, tmp_path: Path) -> None:
    name, write, read, old, new = HELPERS[helper]
    reference = tmp_path / "reference"
    reference.mkdir()
    write(reference / ("old-" + name), old)
    write(reference / ("new-" + name), new)
    old_value, new_value = read(reference / ("old-" + name)), read(reference / ("new-" + name))

    target = tmp_path / "out" / name
    write(target, old)

    def killed_writer() -> None:
        with crash_at(moment):
            write(target, new)

    status = run_and_die(killed_writer)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert_previous_or_new(target, read, old_value, new_value)
    check_readable(target)
    if moment == "after-rename":
        assert read(target) == new_value
    else:
        assert read(target) == old_value


def test_first_write_killed_leaves_no_file_under_the_final_name(tmp_path: Path) -> None:
    """With no previous version, a reader finds nothing (a clean "not there yet"), not half a file."""
    target = tmp_path / "out" / "record.json"

    def killed_writer() -> None:
        with crash_at("mid-write"):
            atomic.write_json(target, NEW)

    run_and_die(killed_writer)
    assert not target.exists()
    assert check_tree_readable(tmp_path / "out") == []


# --- meta-tests: the checks fail without atomic writes -------------------------------------------

@pytest.mark.parametrize("helper", sorted(HELPERS))
def test_check_fails_with_a_non_atomic_writer(helper: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name, write, read, old, new = HELPERS[helper]
    target = tmp_path / "out" / name
    write(target, old)
    old_value = read(target)
    new_path = tmp_path / ("new-" + name)
    write(new_path, new)
    new_value = read(new_path)

    monkeypatch.setattr(atomic, "atomic_path", non_atomic_path)  # inherited by the forked child
    run_and_die(lambda: write(target, new))
    monkeypatch.undo()

    with pytest.raises(AssertionError):
        assert_previous_or_new(target, read, old_value, new_value)


def test_truncated_file_detector_flags_a_non_atomic_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``check_readable``, used after every kill in test_kill_resume.py, does see a truncated output."""
    target = tmp_path / "out" / "manifest.json"
    monkeypatch.setattr(atomic, "atomic_path", non_atomic_path)
    run_and_die(lambda: atomic.write_json(target, NEW))
    monkeypatch.undo()
    with pytest.raises(AssertionError, match="truncated or corrupt"):
        check_tree_readable(tmp_path / "out")
