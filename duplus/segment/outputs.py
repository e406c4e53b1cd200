"""The output folder of `duplus segment`: file names and format, checks before any work, stale files, writing.

Masks are written in a format that keeps the input's geometry exactly: NIfTI-1 stores origin and
spacing as float32, so a mask of an NRRD, MHA or DICOM scan written as NIfTI sits up to ~1e-5 mm
off its scan, and ITK then refuses to combine the two ("Inputs do not occupy the same physical space").
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from duplus.errors import ConfigError

log = logging.getLogger("duplus.segment")

FORMATS = ("nii.gz", "nrrd", "mha")
# What `duplus segment` writes: mask images (in one of FORMATS), or one DICOM file referencing a DICOM series
# input (see duplus.segment.dicom); "masks" is the default.
OUTPUT_TYPES = ("masks", "dicom_seg", "dicom_rtstruct")
DICOM_OUTPUTS = {"dicom_seg": "segmentation.dcm", "dicom_rtstruct": "rtstruct.dcm"}
REPORT = "report.json"
# File names stay well below the 255 bytes most file systems allow, leaving room for the suffix
# and the temporary name an atomic write uses beside the target.
MAX_STEM = 100


def output_format(image: str | Path, chosen: str | None = None, output_type: str | None = None) -> str:
    """Suffix (without dot) of the masks of ``image``: ``chosen`` if given, else the input's own format;
    for a DICOM ``output_type``, that type (its one file is ``DICOM_OUTPUTS[type]``).

    NIfTI inputs keep NIfTI (their geometry is float32 already); NRRD and MetaImage keep theirs,
    as single files. A DICOM folder (or any other input) gets NRRD: it stores geometry as doubles,
    so the mask lies on the scan's grid to the last digit, and 3D Slicer, ITK-SNAP and
    SimpleITK all read it.
    """
    kind = "masks" if output_type is None else str(output_type).strip().lower()
    if kind not in OUTPUT_TYPES:
        raise ConfigError(f"--output-type {output_type}: expected one of {', '.join(OUTPUT_TYPES)}")
    if kind in DICOM_OUTPUTS:
        if chosen is not None:
            raise ConfigError(f"--format {chosen} is for mask images; --output-type {kind} writes one DICOM file "
                              f"({DICOM_OUTPUTS[kind]}): give one of the two")
        if not Path(image).is_dir():
            raise ConfigError(f"--output-type {kind}: {image} is not a DICOM series folder; a DICOM output "
                              "references the series it segments, so -i must be the folder of a DICOM series (for "
                              "other scans use --output-type masks)")
        return kind
    if chosen is not None:
        key = str(chosen).strip().lower().lstrip(".")
        if key not in FORMATS:
            raise ConfigError(f"--format {chosen}: expected one of {', '.join(FORMATS)}")
        return key
    name = Path(image).name.lower()
    if name.endswith((".nii.gz", ".nii")):
        return "nii.gz"
    if name.endswith((".mha", ".mhd")):
        return "mha"
    return "nrrd"


def safe_name(name: str) -> str:
    """File-name form of a class: "liver tumor" -> "liver_tumor"; a long one is cut, with a hash of the whole.

    The hash keeps two long phrases that share their first ``MAX_STEM`` characters apart.
    """
    stem = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "class"
    if len(stem) <= MAX_STEM:
        return stem
    digest = hashlib.sha256(stem.encode("utf-8")).hexdigest()[:8]
    return f"{stem[:MAX_STEM - 9].rstrip('_')}_{digest}"


def output_names(names: list[str], multilabel: bool, fmt: str = "nii.gz") -> list[str]:
    """The files ``write_masks`` writes for these classes (``report.json`` comes beside them)."""
    if fmt in DICOM_OUTPUTS:  # one file holds every class
        return [DICOM_OUTPUTS[fmt]]
    if multilabel:
        return [f"labels.{fmt}", "labels.json"]
    files, used = [], set()
    for name in names:
        stem = safe_name(name)
        while stem in used:  # two phrases resolving to one class keep both files
            stem += "_"
        used.add(stem)
        files.append(f"{stem}.{fmt}")
    return files


def check_output_folder(out_dir: str | Path) -> None:
    """Refuse an output folder that is a file, or lies inside one (``scan.nii.gz/out``)."""
    out = Path(out_dir)
    for place in (out, *out.parents):
        if place.exists():
            if not place.is_dir():
                where = f"--output {out_dir}" if place == out else f"--output {out_dir}: {place}"
                raise ConfigError(f"{where} is a file, not a folder; give a folder for the masks")
            break


def check_outputs(image: str | Path, out_dir: str | Path, files: list[str]) -> None:
    """Refuse an output folder that is a file, or that would replace the input scan or land inside its DICOM folder.

    Nothing is created here; :func:`prepare_folder` does that once the scan has been read.
    """
    check_output_folder(out_dir)
    source = Path(image).resolve()
    out = Path(out_dir).resolve()
    if source.is_dir() and (out == source or source in out.parents):
        raise ConfigError(f"--output {out_dir} is inside the input DICOM folder {image}; choose another folder")
    for name in [*files, REPORT]:
        if (out / name).resolve() == source:
            raise ConfigError(f"--output {out_dir} would overwrite the input {image} with {name}; "
                              "choose another output folder")


def prepare_folder(out_dir: str | Path) -> Path:
    """Create the output folder and prove it writable, so a bad ``--output`` fails before inference, not after."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        # A real file, not os.access: access() says yes to root and knows nothing of read-only mounts or quotas.
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        raise ConfigError(f"--output {out_dir}: cannot write there ({error.strerror or error})") from None
    return out


def previous_outputs(out: Path) -> list[str]:
    """The files an earlier `duplus segment` run into ``out`` wrote, as its ``report.json`` lists them.

    A ``report.json`` that is not such a report (unreadable, or another tool's) lists nothing: its
    folder's files are not this tool's to remove.
    """
    path = out / REPORT
    if not path.is_file():
        return []
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return []
    if not (isinstance(report, dict) and {"duplus_version", "context_prompt", "outputs"} <= report.keys()
            and isinstance(report["outputs"], list)):
        return []
    return [name for name in report["outputs"] if isinstance(name, str)]


def remove_stale(out: Path, previous: list[str], keep: list[str], image: str | Path) -> list[str]:
    """Remove the earlier run's report and the files it listed that this run does not write; returns those removed.

    Called just before the new masks are written: the old report goes first, so until the new one
    is written last the folder holds no report, i.e. no completed run. Only plain names that an
    earlier report lists are touched, never a path leading out of ``out``, nor the input scan.
    """
    source = Path(image).resolve()
    removed = []
    for name in [REPORT, *previous]:
        if name in keep or not name or name in (".", "..") or "/" in name or os.sep in name:
            continue
        path = out / name
        if path.resolve() == source or not (path.is_file() or path.is_symlink()):
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        if name != REPORT:
            removed.append(name)
    if removed:
        log.info("%s: removed %d file(s) of an earlier run that this run does not write: %s", out, len(removed),
                 ", ".join(removed))
    return removed


def overlap_notes(names: list[str], predicted: list[int], kept: list[int], file: str = "labels.nii.gz") -> list[str]:
    """One line per class that a one-label-per-voxel image shows smaller than it was predicted.

    Classes may overlap (kidney and right kidney, liver and liver tumor); in the label image the
    smaller is drawn over the larger, so the larger keeps only part of its voxels there.
    """
    return [f"{file}: '{name}' keeps {kept[k]} of its {predicted[k]} voxels; the rest is drawn as smaller "
            "classes that overlap it (one label per voxel; without --multilabel every class gets its own mask)"
            for k, name in enumerate(names) if kept[k] < predicted[k]]


def restored_mask(masks: Any, k: int, meta: Mapping[str, Any]) -> Any:
    """Class ``k`` of preprocessed-grid ``masks`` on the input grid, as a uint8 SimpleITK image."""
    from duplus.data.restore import restore_to_original
    from duplus.inference.packed import PackedMasks

    if isinstance(masks, PackedMasks):  # boundary probabilities interpolated where they were kept
        return masks.restored(k, meta)
    return restore_to_original(np.asarray(masks[k], dtype=np.uint8), meta, is_label=True)


def write_masks(out: Path, masks: Any, meta: Mapping[str, Any], names: list[str], multilabel: bool,
                fmt: str = "nii.gz", sources: list[Path] | None = None, image: str | Path = "") -> list[str]:
    """Restore [K, Z, Y, X] preprocessed-grid masks to the input grid and write them; returns file names.

    ``masks[k]`` is class k (a bool array or ``PackedMasks``); one class is restored at a time, so
    memory holds one full-resolution mask (plus the label map), not K of them. A DICOM ``fmt`` writes
    one file referencing ``sources``, the DICOM files of the input ``image``.
    """
    if fmt in DICOM_OUTPUTS:
        from duplus.segment.dicom import write_dicom

        return write_dicom(out, fmt, lambda k: restored_mask(masks, k, meta), names, sources or [], str(image))
    import SimpleITK as sitk

    from duplus.atomic import write_json
    from duplus.data.image_io import write_image

    out.mkdir(parents=True, exist_ok=True)

    def restored(k: int) -> sitk.Image:
        return restored_mask(masks, k, meta)

    files = output_names(names, multilabel, fmt)
    if not multilabel:
        for k, file in enumerate(files):
            write_image(restored(k), out / file)
        return files
    sizes = [int(np.count_nonzero(masks[k])) for k in range(len(names))]
    label, reference, predicted = None, None, [0] * len(names)
    # Larger structures first, so a lesion inside its organ (liver tumor in liver) stays visible.
    for k in sorted(range(len(names)), key=lambda i: -sizes[i]):
        image = restored(k)
        if label is None:
            label = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8 if len(names) < 256 else np.uint16)
            reference = image
        inside = sitk.GetArrayViewFromImage(image) > 0
        predicted[k] = int(np.count_nonzero(inside))
        label[inside] = k + 1
    kept = np.bincount(label.ravel(), minlength=len(names) + 1)[1:]
    for line in overlap_notes(names, predicted, [int(v) for v in kept], files[0]):
        log.warning(line)
    image = sitk.GetImageFromArray(label)
    image.CopyInformation(reference)
    write_image(image, out / files[0])
    write_json(out / files[1], {"0": "background", **{str(k + 1): name for k, name in enumerate(names)}})
    return files
