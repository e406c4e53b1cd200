"""Disk full and read-only output folders: a clear error naming the path, earlier outputs intact.

Expectation "write-failure-is-clean": when the disk fills up (ENOSPC while writing or flushing) or
the output folder cannot be written (EROFS/EACCES when creating the temporary file or renaming it),
  * the error raised names the output path (not only the hidden temporary name),
  * it keeps its OSError type and errno, so callers that fall back on OSError still do,
  * the previous version of the output is byte-identical, and no temporary file is left behind.

The failures are injected (tests run as root, for whom chmod 0555 does not stop writes, and
mounting a tiny tmpfs needs privileges); one test uses a real read-only folder when not root.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pytest
import torch
from reliability_helpers import DATASETS, final_files, tiny_config

import duplus.atomic as atomic


def disk_full(*_args: Any, **_kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def read_only_folder(*_args: Any, dir: Any = None, **_kwargs: Any) -> Any:  # noqa: A002 - mkstemp's name
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))


def rename_refused(src: Any, dst: Any) -> None:
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(src), str(dst))


def half_written_then_full(path: Path) -> None:
    """The disk fills up part-way: half of the temporary file made it, then ENOSPC."""
    os.truncate(path, os.path.getsize(path) // 2)
    disk_full()


FAULTS: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "enospc-on-write": lambda mp: mp.setattr(atomic, "_fsync_file", half_written_then_full),
    "enospc-on-fsync": lambda mp: mp.setattr(atomic, "_fsync_file", disk_full),
    "read-only-folder": lambda mp: mp.setattr(atomic.tempfile, "mkstemp", read_only_folder),
    "rename-refused": lambda mp: mp.setattr(atomic.os, "replace", rename_refused),
}


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_failed_write_names_the_path_and_keeps_the_old_file(fault: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "results" / "summary.json"
    atomic.write_json(target, {"run": 1, "rows": list(range(100))})
    before = snapshot(tmp_path)

    FAULTS[fault](monkeypatch)
    with pytest.raises(OSError) as caught:
        atomic.write_json(target, {"run": 2, "rows": list(range(500))})
    monkeypatch.undo()

    assert str(target) in str(caught.value), f"the error does not name {target}: {caught.value}"
    assert caught.value.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES)
    assert snapshot(tmp_path) == before, "the earlier output changed or a temporary file was left behind"


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_every_atomic_helper_fails_cleanly(fault: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writers: dict[str, tuple[Callable[[Path, Any], None], Any]] = {
        "a.txt": (atomic.write_text, "text"),
        "a.bin": (atomic.write_bytes, b"\x00" * 300),
        "a.npy": (atomic.save_npy, np.zeros(300)),
        "a.csv": (atomic.write_csv, pd.DataFrame({"x": range(300)})),
        "a.safetensors": (atomic.save_safetensors, {"w": torch.zeros(300)}),
    }
    for name, (write, value) in writers.items():
        write(tmp_path / name, value)
    before = snapshot(tmp_path)
    FAULTS[fault](monkeypatch)
    for name, (write, value) in writers.items():
        with pytest.raises(OSError, match=str(tmp_path / name).replace(".", r"\.")):
            write(tmp_path / name, value)
    monkeypatch.undo()
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0555 folder anyway")
def test_real_read_only_folder(tmp_path: Path) -> None:
    folder = tmp_path / "results"
    atomic.write_json(folder / "a.json", {"ok": True})
    folder.chmod(0o555)
    try:
        with pytest.raises(OSError, match="a.json"):
            atomic.write_json(folder / "a.json", {"ok": False})
        assert json.loads((folder / "a.json").read_text(encoding="utf-8")) == {"ok": True}
    finally:
        folder.chmod(0o755)


# --- stages --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def raw_dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    from duplus.data.download import run_download

    root = tmp_path_factory.mktemp("rawdisk")
    config = tiny_config(root)
    record = root / "data" / "raw" / DATASETS[0] / "download.json"
    run_download(DATASETS[0], config, record)
    return config, record


@pytest.mark.parametrize("failing_write", [1, 6, "manifest.csv"])
def test_preprocess_out_of_space_keeps_the_earlier_store(failing_write: int | str, raw_dataset: tuple[dict, Path],
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Disk full in the middle of a rerun of preprocessing: the earlier store is still complete."""
    from duplus.data.preprocess import run_preprocess

    config, record = raw_dataset
    manifest = tmp_path / "store" / "manifest.csv"
    run_preprocess(DATASETS[0], config, record, manifest, threads=1)
    before = {p: p.read_bytes() for p in final_files(tmp_path / "store")}

    real = atomic.atomic_path
    count = [0]

    def filling_disk(path: Any, suffix: str | None = None) -> Any:
        count[0] += 1
        if count[0] == failing_write or Path(path).name == failing_write:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, suffix)

    monkeypatch.setattr(atomic, "atomic_path", filling_disk)
    monkeypatch.setattr("duplus.data.preprocess.atomic_path", filling_disk)
    with pytest.raises(OSError) as caught:
        run_preprocess(DATASETS[0], config, record, manifest, threads=1)
    monkeypatch.undo()

    assert caught.value.errno == errno.ENOSPC and str(tmp_path / "store") in str(caught.value)
    after = {p: p.read_bytes() for p in final_files(tmp_path / "store")}
    assert after.keys() == before.keys()
    changed = [str(p) for p in before if p.suffix != ".npz" and before[p] != after[p]]
    assert not changed, f"files of the earlier store changed: {changed}"
    assert not list((tmp_path / "store").glob(".staging-*")), "a staging folder was left behind"


def test_checkpoint_out_of_space_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from duplus.train.checkpoint import load_latest_checkpoint, save_checkpoint

    save_checkpoint(tmp_path, 10, {"w": torch.full((50,), 10.0), "step": 10})
    monkeypatch.setattr(atomic, "_fsync_file", disk_full)
    with pytest.raises(OSError, match="step_00000020"):
        save_checkpoint(tmp_path, 20, {"w": torch.full((50,), 20.0), "step": 20})
    monkeypatch.undo()
    step, state = load_latest_checkpoint(tmp_path)  # type: ignore[misc]
    assert step == 10 and state["step"] == 10 and torch.equal(state["w"], torch.full((50,), 10.0))


def test_prompt_cache_in_read_only_folder_keeps_new_prompts_in_memory(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """ensure_prompts documents the fallback: the cache file stays as it was, the run goes on."""
    from duplus.prompts.cache import PromptCache, build_prompt_cache, ensure_prompts

    class Encoder:
        identity, dim = "fixed-encoder", 4

        def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
            return torch.stack([torch.full((4,), float(len(t))) for t in texts])

    path = tmp_path / "prompts" / "enc.safetensors"
    build_prompt_cache(["a scan", "a liver"], Encoder(), path)
    before = snapshot(tmp_path / "prompts")
    monkeypatch.setattr(atomic.tempfile, "mkstemp", read_only_folder)
    monkeypatch.setattr(tempfile, "mkstemp", read_only_folder)
    cache = ensure_prompts(path, ["a new free-text prompt"], Encoder())
    monkeypatch.undo()
    assert "a new free-text prompt" in cache and "a scan" in cache
    assert snapshot(tmp_path / "prompts") == before
    assert "a new free-text prompt" not in PromptCache.load(path)
