"""`duplus segment` on many scans: a folder searched recursively, or a CSV list; the model loads once.

Each scan gets its own output folder (as one `duplus segment` call would write it); the next scan is
read and preprocessed in a thread while the current one is predicted; a scan whose ``report.json``
is complete and was made with the same model, prompts and settings from the same input files is
skipped (a rerun after an interruption does only what is left); a scan that fails is recorded and
the others go on. ``summary.json`` and ``summary.csv`` list every scan.
"""

from __future__ import annotations

import concurrent.futures
import csv
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

from duplus.errors import ConfigError, DuplusError

log = logging.getLogger("duplus.segment")

# File scans by suffix (case does not matter); a .raw/.zraw next to an .mhd is its data, not a scan.
SCAN_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_SUFFIXES = (".dcm", ".ima")
SUMMARY_JSON, SUMMARY_CSV = "summary.json", "summary.csv"
CSV_IMAGE, CSV_ID = "image", "id"
SUMMARY_COLUMNS = ("scan", "input", "output", "status", "seconds", "peak_memory_mb", "classes", "error")


class BatchScan(NamedTuple):
    """One scan of a batch: its path, and its output folder's name relative to the batch's output folder."""

    image: Path
    name: str


def _is_dicom_file(path: Path) -> bool:
    # The DICOM file preamble: 128 bytes, then "DICM" (PS3.10 7.1). Checked by hand rather than asking
    # GDCM for series of every folder, which prints warnings for folders that are not DICOM at all.
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def holds_dicom(folder: Path) -> bool:
    """Whether ``folder`` itself (not its subfolders) holds DICOM files."""
    try:
        with os.scandir(folder) as entries:  # closed also when any() stops at the first DICOM file
            return any(entry.is_file() and _is_dicom_file(Path(entry.path)) for entry in entries)
    except OSError:
        return False


def is_batch_input(path: str | os.PathLike) -> bool:
    """A CSV list, or a folder that is not itself a DICOM series: many scans. Anything else is one scan."""
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() == ".csv"
    return path.is_dir() and not holds_dicom(path)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in SCAN_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _unique(scans: list[tuple[Path, str, str]]) -> list[BatchScan]:
    """Output names without clashes: case.nii.gz and case.nrrd side by side become case_nii_gz and case_nrrd
    (and a name still taken gets _2, _3...). Case is ignored: two names may be one folder on macOS or Windows."""
    counts: dict[str, int] = {}
    for _, name, _ in scans:
        counts[name.lower()] = counts.get(name.lower(), 0) + 1
    unique, used = [], set()
    for image, name, kind in scans:
        if counts[name.lower()] > 1:
            name = f"{name}_{kind.strip('.').replace('.', '_')}"
        base, number = name, 1
        while name.lower() in used:
            number += 1
            name = f"{base}_{number}"
        used.add(name.lower())
        unique.append(BatchScan(image, name))
    return unique


def find_scans(source: str | os.PathLike, out_dir: str | os.PathLike) -> list[BatchScan]:
    """The scans of a folder (searched recursively, in name order) or of a CSV list.

    In a folder: NIfTI/NRRD/MHA files, and every folder holding DICOM files (one series each). The
    output folder, when it lies inside, and hidden files are left out. A CSV has a column ``image``
    (paths relative to the CSV's folder, or absolute) and may have ``id``: the output folder's name.
    """
    source = Path(source)
    if source.is_file():
        return _read_list(source)
    out = Path(out_dir).resolve()
    root = source.resolve()
    if out == root:
        raise ConfigError(f"--output {out_dir} is the input folder itself; give another folder (or a new "
                          "subfolder) for the masks")
    found: list[tuple[Path, str, str]] = []
    for folder, subfolders, names in os.walk(root):
        here = Path(folder)
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".") and (here / d).resolve() != out)
        relative = here.relative_to(root)
        if here != root and holds_dicom(here):
            found.append((here, relative.as_posix(), "dicom"))
        for name in sorted(names):
            kind = next((s for s in SCAN_SUFFIXES if name.lower().endswith(s)), None)
            if kind and not name.startswith("."):
                found.append((here / name, (relative / _stem(Path(name))).as_posix(), kind))
    if not found:
        raise ConfigError(f"{source}: no scans found (searched recursively for {', '.join(SCAN_SUFFIXES)} files "
                          "and folders of DICOM files)")
    return _unique(found)


def _read_list(path: Path) -> list[BatchScan]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            columns = [str(c).strip().lower() for c in reader.fieldnames or []]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise ConfigError(f"{path}: cannot read the list of scans ({error})") from None
    if CSV_IMAGE not in columns:
        raise ConfigError(f"{path}: a list of scans needs a column '{CSV_IMAGE}' (and may have '{CSV_ID}', the output "
                          f"folder's name); its columns are {columns}")
    scans: list[tuple[Path, str, str]] = []
    given: dict[str, list[int]] = {}
    for line, raw in enumerate(rows, start=2):
        row = {str(k).strip().lower(): (v or "").strip() for k, v in raw.items() if isinstance(v, str)}
        if not row.get(CSV_IMAGE):
            continue
        image = Path(row[CSV_IMAGE]).expanduser()
        image = image if image.is_absolute() else path.parent / image
        name = row.get(CSV_ID) or _stem(image)
        if row.get(CSV_ID):
            if "/" in name or "\\" in name or name in (".", ".."):
                raise ConfigError(f"{path}, line {line}: id {name!r} must be a plain folder name")
            given.setdefault(name.lower(), []).append(line)
        scans.append((image, name, "dicom" if image.is_dir() else _stem_suffix(image)))
    clashes = {name: lines for name, lines in given.items() if len(lines) > 1}
    if clashes:
        listed = "; ".join(f"{name} (lines {', '.join(map(str, lines))})" for name, lines in clashes.items())
        raise ConfigError(f"{path}: ids used twice: {listed}; each scan needs its own output folder")
    if not scans:
        raise ConfigError(f"{path}: the list names no scans (column '{CSV_IMAGE}' is empty)")
    return _unique(scans)


def _stem_suffix(path: Path) -> str:
    return next((s for s in SCAN_SUFFIXES if path.name.lower().endswith(s)), path.suffix or "file")


def completed(out: Path, settings: dict[str, Any], image: Path) -> bool:
    """Whether ``out`` holds a finished run of these settings on this very input (its files' hash unchanged)."""
    from duplus.hashing import sha256_files
    from duplus.segment.outputs import REPORT

    try:
        report = json.loads((out / REPORT).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    if not isinstance(report, dict) or report.get("settings") != settings:
        return False
    if report.get("input") != str(image) or not isinstance(report.get("outputs"), list):
        return False
    if not all(isinstance(name, str) and (out / name).is_file() for name in report["outputs"]):
        return False
    inputs = [Path(p) for p in report.get("input_files") or []]
    try:
        return bool(inputs) and sha256_files(inputs) == report.get("input_sha256")
    except OSError:
        return False


def _peak_memory() -> Any:
    from duplus.runtime import RssPeak

    return RssPeak(interval=0.05)


def run_batch(segmenter: Any, scans: list[BatchScan], out_dir: str | os.PathLike, *, channel: int | None = None,
              mask_format: str | None = None, output_type: str | None = None) -> dict[str, Any]:
    """Segment every scan into ``out_dir/<name>/``; write and return the summary (``summary.json``/``.csv``)."""
    from duplus.atomic import write_json
    from duplus.segment.outputs import output_format, prepare_folder

    out = prepare_folder(out_dir)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    todo: list[tuple[int, BatchScan]] = []
    for index, scan in enumerate(scans):
        row = {"scan": scan.name, "input": str(scan.image), "output": str(out / scan.name), "status": "pending",
               "seconds": None, "peak_memory_mb": None, "classes": list(segmenter.request.names), "error": None}
        rows.append(row)
        try:
            settings = segmenter.settings(output_format(scan.image, mask_format, output_type), channel)
        except DuplusError as error:  # a --format that does not fit: stop before any scan, as one call would
            raise ConfigError(str(error)) from None
        if completed(out / scan.name, settings, scan.image):
            row["status"] = "skipped"
            log.info("%s: done by an earlier run with the same model, prompts and settings; skipped", scan.name)
        else:
            todo.append((index, scan))
    if todo:
        segmenter.load()  # a model that cannot load stops the batch here, not once per scan
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="duplus-read") as reader:
        ahead = {}
        if todo:
            ahead[0] = reader.submit(segmenter.prepare, todo[0][1].image, channel)
        for position, (index, scan) in enumerate(todo):
            if position + 1 < len(todo):  # the next scan is read while this one is predicted
                ahead[position + 1] = reader.submit(segmenter.prepare, todo[position + 1][1].image, channel)
            row, mark = rows[index], time.perf_counter()
            log.info("[%d/%d] %s", position + 1, len(todo), scan.image)
            try:
                with _peak_memory() as peak:
                    prepared = ahead.pop(position).result()
                    report = segmenter.segment(scan.image, out / scan.name, channel=channel, mask_format=mask_format,
                                               prepared=prepared, output_type=output_type)
                row.update(status="done", seconds=round(report["timings_s"]["total"], 3),
                           peak_memory_mb=round(peak.mb, 1))
            except (DuplusError, OSError, RuntimeError, ValueError, MemoryError) as error:
                # One bad scan (unreadable, another modality, a full disk) is recorded; the others go on.
                message = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
                if isinstance(error, OSError) and error.filename:
                    message = f"{error.filename}: {error.strerror or error}"
                log.error("%s: failed: %s", scan.name, message)
                log.debug("%s", scan.name, exc_info=True)
                row.update(status="failed", seconds=round(time.perf_counter() - mark, 3), error=message)
    counts = {status: sum(row["status"] == status for row in rows) for status in ("done", "skipped", "failed")}
    summary = {"scans": rows, "counts": counts, "seconds": round(time.perf_counter() - started, 3),
               "model_load_seconds": round(segmenter.load_seconds, 3), "device": str(segmenter.request.device)}
    write_json(out / SUMMARY_JSON, summary)
    _write_csv(out / SUMMARY_CSV, rows)
    return summary


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    import io

    from duplus.atomic import write_bytes

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "classes": "; ".join(row["classes"]), "error": row["error"] or ""})
    write_bytes(path, buffer.getvalue().encode("utf-8"))
