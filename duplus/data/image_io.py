"""Reading and writing medical images (NIfTI, NRRD, MHA, DICOM series) with errors that name the file.

Every reader returns a 3-D ``SimpleITK.Image`` with finite values and positive spacing, or raises ``DataError``.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import threading
import zlib
from pathlib import Path
from typing import Iterator, Sequence

import nibabel
import numpy as np
import SimpleITK as sitk

from duplus.atomic import atomic_path
from duplus.data.image_files import image_files
from duplus.errors import DataError
from duplus.runtime import held_log_records

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def _dicom_tags(file: str, *keys: str) -> list[str]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    reader.ReadImageInformation()
    return [reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else "" for key in keys]


def _describe_series(folder: Path, series_id: str, files: Sequence[str]) -> str:
    modality, description = _dicom_tags(files[0], "0008|0060", "0008|103e")
    return f"{modality or '?'} '{description}' ({len(files)} slices, series ...{series_id[-12:]})"


def _plane_tags(files: Sequence[str]) -> list[list[str]]:
    """(ImagePositionPatient, ImageOrientationPatient) of every file, read once for both checks."""
    return [_dicom_tags(file, "0020|0032", "0020|0037") for file in files]


def _one_orientation(planes: Sequence[Sequence[str]]) -> bool:
    """Whether every image of a series lies in the same plane orientation (a stack, not a localizer)."""
    orientations = set()
    for _, orientation in planes:
        try:
            orientations.add(tuple(round(float(v), 3) for v in orientation.split("\\")))
        except ValueError:
            return True  # no usable orientation tag: cannot tell, count it as a stack
        if len(orientations) > 1:
            return False
    return True


def _check_slice_positions(folder: Path, planes: Sequence[Sequence[str]]) -> None:
    """Refuse a series that is not one evenly spaced stack: ITK would stack it anyway, with a wrong spacing.

    Several echoes, phases or time frames under one series UID share slice positions; missing
    slices leave uneven steps. Both give a volume whose geometry (and so every mask) is wrong.
    """
    positions, points, normal = [], [], None
    for position, orientation in planes:
        try:
            point = np.array([float(v) for v in position.split("\\")])
            if normal is None:
                axes = np.array([float(v) for v in orientation.split("\\")])
                normal = np.cross(axes[:3], axes[3:])
        except ValueError:
            return  # no usable ImagePositionPatient / ImageOrientationPatient: nothing to check
        if point.shape != (3,) or normal is None or normal.shape != (3,):
            return
        positions.append(float(point @ normal))
        points.append(point)
    if len(positions) < 2:
        return
    _check_stack_is_not_sheared(folder, np.asarray(points), normal, np.asarray(positions))
    ordered = np.sort(np.asarray(positions))
    steps = np.diff(ordered)
    if np.any(steps < 1e-3):
        repeats = len(positions) - len(np.unique(np.round(ordered, 3)))
        raise DataError(f"{folder}: {repeats} of its {len(positions)} DICOM slices repeat a slice position: the series "
                        "holds several volumes (echoes, phases or time frames); put each volume in its own folder "
                        "or convert it to NIfTI")
    typical = float(np.median(steps))
    if np.any(np.abs(steps - typical) > 0.05 * typical + 0.01):
        raise DataError(f"{folder}: DICOM slice spacing is uneven ({steps.min():.3g} to {steps.max():.3g} mm): slices "
                        "are missing or the series mixes volumes; a stack of unevenly spaced slices has no single "
                        "spacing")


# Slice origins may stray from the line along the slice normal by rounding in the writer; a gantry
# tilt moves them a millimetre or more per centimetre of stack.
SHEAR_TOLERANCE_MM = 0.1


def _check_stack_is_not_sheared(folder: Path, points: np.ndarray, normal: np.ndarray, positions: np.ndarray) -> None:
    """Refuse slices whose origins do not line up along the slice normal (a CT gantry tilt).

    ITK stacks them anyway with an orthonormal direction: the in-plane drift from slice to slice is
    lost and the slice spacing becomes the distance between origins (5.18 mm for 5 mm slices at
    15 degrees), so the volume is sheared and stretched and every mask is displaced in the patient.
    """
    unit = normal / np.linalg.norm(normal)
    order = np.argsort(positions)
    offsets = points[order] - points[order[0]]
    drift = offsets - np.outer(offsets @ unit, unit)
    lateral = float(np.linalg.norm(drift, axis=1).max())
    if lateral > SHEAR_TOLERANCE_MM:
        extent = float(positions.max() - positions.min())
        angle = float(np.degrees(np.arctan2(lateral, extent))) if extent > 0 else 90.0
        raise DataError(f"{folder}: DICOM slice origins drift {lateral:.3g} mm sideways over a {extent:.3g} mm stack "
                        f"(a gantry tilt of about {angle:.2g} degrees): the slices do not form a rectangular volume; "
                        "convert the series with a tool that corrects gantry tilt (e.g. dcm2niix) and give the NIfTI")


_ITK_WARNINGS = threading.Lock()


@contextlib.contextmanager
def _itk_warnings_off() -> Iterator[None]:
    """Silence the warnings ITK prints on stderr itself, inside the block.

    Used where our own error says the same in words that name the file (GDCM's "No Series were found"
    on a folder without DICOM files). ITK's switch is global: the lock keeps two threads from restoring
    each other's setting.
    """
    with _ITK_WARNINGS:
        shown = sitk.ProcessObject.GetGlobalWarningDisplay()
        sitk.ProcessObject.SetGlobalWarningDisplay(False)
        try:
            yield
        finally:
            sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _read_dicom_series(folder: Path) -> tuple[sitk.Image, list[Path]]:
    with _itk_warnings_off():
        series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise DataError(f"{folder}: folder holds no DICOM series (expected a NIfTI/NRRD/MHA file or DICOM files)")
    series = {sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series_ids}
    if len(series) > 1 and all(len(files) == 1 for files in series.values()):
        # Files that each carry their own series UID would otherwise become a one-slice "volume".
        raise DataError(f"{folder}: its {len(series)} DICOM files each form a series of one slice; expected one "
                        f"series of slices (convert the folder to NIfTI, or fix the SeriesInstanceUID tags)")
    # Scouts and localizers beside the volume are ignored (1-2 images, or a three-plane localizer
    # whose images lie in several orientations); two volumes are ambiguous (a PET/CT study, two
    # reconstructions): the user points at one.
    planes = {sid: _plane_tags(files) for sid, files in series.items() if len(files) >= 3}
    volumes = {sid: series[sid] for sid, tags in planes.items() if _one_orientation(tags)}
    if len(volumes) > 1:
        listed = "; ".join(_describe_series(folder, sid, files) for sid, files in volumes.items())
        raise DataError(f"{folder}: holds {len(volumes)} DICOM volumes ({listed}); give a folder with one series")
    chosen = next(iter(volumes), max(series, key=lambda sid: len(series[sid])))
    files = series[chosen]
    if len(series) > 1:
        log.info("%s: reading %s; ignoring %d other series (scouts)", folder, _describe_series(folder, chosen, files),
                 len(series) - 1)
    _check_slice_positions(folder, planes.get(chosen) or _plane_tags(files))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader.Execute(), [Path(file) for file in files]


def _single_dicom_of_a_series(path: Path) -> int:
    """How many files the series of this DICOM file has in its folder (1 when it stands alone)."""
    try:
        (series_id,) = _dicom_tags(str(path), "0020|000e")
        if not series_id:
            return 1
        return len(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path.parent), series_id))
    except RuntimeError:
        return 1


def _select_channel(image: sitk.Image, path: Path, channel: int | None) -> sitk.Image:
    """Reduce a 4-D or multi-component image to the 3-D volume ``channel`` (a sequence or time frame)."""
    components = image.GetNumberOfComponentsPerPixel()
    if components == 1 and image.GetPixelIDTypeAsString().startswith("vector of"):
        # A NIfTI with intent "vector" and no fifth dimension reads as a vector image of one
        # component, which no resampling filter accepts: it is the scalar volume.
        image = sitk.VectorIndexSelectionCast(image, 0)
    if channel and components == 1 and image.GetDimension() == 3:
        raise DataError(f"{path}: channel {channel} asked for, but the image is a single 3-D volume")
    if components > 1:
        if channel is None:
            raise DataError(f"{path}: image has {components} components per voxel; expected a scalar 3-D image "
                            f"(set the dataset's channel, or --channel of duplus segment, to pick one)")
        if not 0 <= channel < components:
            raise DataError(f"{path}: channel {channel} asked for but the image has {components} components "
                            f"(valid 0..{components - 1})")
        image = sitk.VectorIndexSelectionCast(image, channel)
    if image.GetDimension() == 4:
        frames = image.GetSize()[3]
        if channel is None and frames == 1:
            channel = 0
        if channel is None:
            raise DataError(f"{path}: image is 4-D with {frames} volumes, size {image.GetSize()}; expected a 3-D "
                            f"image (set the dataset's channel, or --channel of duplus segment, to pick one volume)")
        if not 0 <= channel < frames:
            raise DataError(f"{path}: volume {channel} asked for but the 4-D image has {frames} volumes "
                            f"(valid 0..{frames - 1})")
        size = list(image.GetSize())
        size[3] = 0
        image = sitk.Extract(image, size, [0, 0, 0, channel])
    return image


def check_image(image: sitk.Image, path: str | os.PathLike) -> sitk.Image:
    """Raise ``DataError`` naming ``path`` unless ``image`` is 3-D, non-empty, finite and has positive spacing."""
    if image.GetDimension() != 3:
        raise DataError(f"{path}: image is {image.GetDimension()}-D with size {image.GetSize()}; expected a 3-D volume")
    if min(image.GetSize()) < 1:
        raise DataError(f"{path}: image is empty (size {image.GetSize()})")
    spacing = image.GetSpacing()
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise DataError(f"{path}: voxel spacing {spacing} must be positive and finite")
    # A NaN or infinite origin or direction (NRRD/MHA headers are read as written) makes every
    # resampled grid NaN and every restored mask empty.
    if not np.isfinite(image.GetOrigin()).all() or not np.isfinite(image.GetDirection()).all():
        raise DataError(f"{path}: image origin {image.GetOrigin()} or direction {image.GetDirection()} is not finite")
    if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        array = sitk.GetArrayViewFromImage(image)
        if not np.isfinite(array).all():
            bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
            raise DataError(f"{path}: image holds {bad} NaN/Inf voxels; expected finite intensities")
    return image


def _gzip_payload_size(path: Path) -> int | None:
    """Bytes a gzip file inflates to, or None if the stream is truncated or corrupt."""
    total = 0
    try:
        with gzip.open(path, "rb") as handle:
            while chunk := handle.read(1 << 22):
                total += len(chunk)
    except (EOFError, OSError, zlib.error):
        return None
    return total


def _check_nifti_header(path: Path, raw: nibabel.Nifti1Header, ndim: int) -> None:
    """Refuse the header fields ITK misreads silently, hangs on or crashes on."""
    # ITK's NIfTI reader never returns on an sform with an infinite offset and permuted axes, and
    # would carry a NaN or infinite origin into every resampling: the affine in use must be finite.
    affines = {"sform (srow_x/y/z)": [raw[f"srow_{a}"] for a in "xyz"] if raw["sform_code"] > 0 else [],
               "qform (quatern_*, qoffset_*)": [raw[k] for k in ("quatern_b", "quatern_c", "quatern_d", "qoffset_x",
                                                                 "qoffset_y", "qoffset_z")] if raw["qform_code"] > 0
               else []}
    for name, values in affines.items():
        if not np.isfinite(np.asarray(values, dtype=float)).all():
            raise DataError(f"{path}: the NIfTI header's {name} holds NaN or infinite values; expected a finite "
                            "voxel-to-patient transform")
    # ITK corrupts its heap (the process aborts) reading integer voxels of several components per
    # voxel (dim[5] > 1) that carry an intensity scaling: no error to catch, so refused before it.
    slope, inter = float(raw["scl_slope"]), float(raw["scl_inter"])
    scaled = np.isfinite(slope) and slope != 0 and (slope != 1 or (np.isfinite(inter) and inter != 0))
    if raw["dim"][0] >= 5 and raw["dim"][5] > 1 and scaled and raw.get_data_dtype().kind in "iu":
        raise DataError(f"{path}: NIfTI with {int(raw['dim'][5])} components per voxel, integer voxels and an "
                        f"intensity scaling (scl_slope {slope:g}, scl_inter {inter:g}) cannot be read safely; save "
                        "it with float voxels, or one volume per file")
    # ITK reads a zero, NaN or infinite voxel size (pixdim) as 1 mm, whatever the sform says, with
    # only a warning on stderr: every distance, resampling and HD95 would then be silently wrong.
    voxel_size = [float(v) for v in raw["pixdim"][1:1 + min(3, ndim)]]
    if not all(np.isfinite(v) and v != 0 for v in voxel_size):
        raise DataError(f"{path}: the NIfTI header's voxel size (pixdim) is {voxel_size}; it must be finite and "
                        "non-zero (the reader would take 1 mm instead)")


def _check_nifti_file(path: Path) -> None:
    """Catch what the ITK NIfTI reader lets through: truncated voxel data, NaN/Inf (it reads them as 0) and
    an unusable voxel size (it reads 1 mm)."""
    try:
        # nibabel logs the header fields it mends on loading, on stderr twice (its own handler, then the root
        # logger's): held here, and said once, in our words, where they matter (_report_mended).
        with held_log_records("nibabel.global") as mended:
            nifti = nibabel.load(str(path))
        header = nifti.header
        # The array proxy knows the real data offset (some writers leave vox_offset at 0 in the header).
        offset = int(getattr(nifti.dataobj, "offset", header.get_data_offset()))
        expected = offset + int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
    except Exception as error:  # noqa: BLE001 - any header failure means the file is unusable
        raise DataError(f"{path}: cannot read the image (corrupt NIfTI header: {error})") from None
    # The raw header, unchecked: nibabel's checks may already have mended what ITK would misread.
    with nibabel.openers.ImageOpener(str(path)) as handle:
        _check_nifti_header(path, type(header).from_fileobj(handle, check=False), len(header.get_data_shape()))
    _report_mended(path, mended)
    if path.name.lower().endswith(".gz"):
        with open(path, "rb") as handle:
            handle.seek(-4, os.SEEK_END)
            trailer = int.from_bytes(handle.read(4), "little")
        # The gzip trailer holds the inflated size (mod 2**32); only on a mismatch is the stream inflated.
        if trailer != expected % (1 << 32):
            size = _gzip_payload_size(path)
            if size is None or size < expected:
                raise DataError(f"{path}: cannot read the image: the file is truncated or corrupt "
                                f"(expected {expected} bytes after decompression)")
    elif path.stat().st_size < expected:
        raise DataError(f"{path}: cannot read the image: the file is truncated ({path.stat().st_size} of {expected} "
                        f"bytes)")
    if np.issubdtype(header.get_data_dtype(), np.floating):
        data = np.asanyarray(nifti.dataobj)
        if not np.isfinite(data).all():
            bad = int(data.size - np.count_nonzero(np.isfinite(data)))
            raise DataError(f"{path}: image holds {bad} NaN/Inf voxels; expected finite intensities")


def _report_mended(path: Path, records: list[logging.LogRecord]) -> None:
    """One line for the NIfTI header fields nibabel mended that may change where the scan lies (a negative
    pixdim, its warning levels); below that (a qfac of 0, which ITK reads as 1 too), a debug line only."""
    serious = [record.getMessage() for record in records if record.levelno >= logging.WARNING]
    if serious:
        log.warning("%s: the NIfTI header needed correcting (%s); check the scan's spacing and orientation", path,
                    "; ".join(serious))
    for record in records:
        if record.levelno < logging.WARNING:
            log.debug("%s: NIfTI header: %s", path, record.getMessage())


def read_image(path: str | os.PathLike, channel: int | None = None) -> sitk.Image:
    """Read a NIfTI/NRRD/MHA file or a DICOM series folder as a checked 3-D ``SimpleITK.Image``.

    Args:
        path: image file, or a folder holding one DICOM series.
        channel: volume to keep from a 4-D image (or component of a vector image); ``None`` requires 3-D.

    Raises:
        DataError: naming ``path`` when the file is missing, unreadable or truncated, not 3-D,
            holds NaN/Inf, or has a non-positive spacing.
    """
    return _read(Path(path), channel)[0]


def read_image_files(path: str | os.PathLike, channel: int | None = None) -> tuple[sitk.Image, list[Path]]:
    """:func:`read_image`, and the files the image was read from: the file itself, a .mhd/.nhdr header
    then its voxel data file(s), or the DICOM series' files (sorted by name; scouts beside it left out)."""
    image, series = _read(Path(path), channel)
    return image, sorted(series) if series is not None else image_files(path)


def _read(path: Path, channel: int | None) -> tuple[sitk.Image, list[Path] | None]:
    """The checked image (see :func:`read_image`), and the DICOM files it was read from (None for an image file)."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_file() and path.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_file(path)
    if path.is_file() and path.suffix.lower() in (".dcm", ".ima"):
        slices = _single_dicom_of_a_series(path)
        if slices > 1:
            raise DataError(f"{path}: one file of a {slices}-slice DICOM series; give its folder {path.parent} "
                            "to read the whole volume")
    try:
        image, series = _read_dicom_series(path) if path.is_dir() else (sitk.ReadImage(str(path)), None)
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown reader error"
        raise DataError(f"{path}: cannot read the image (corrupt, truncated or not an image file): "
                        f"{first_line}") from None
    try:
        image = _select_channel(image, path, channel)
    except RuntimeError as error:  # e.g. a 4-D vector image: ITK's component selection is 2-D/3-D only
        raise DataError(f"{path}: cannot take one 3-D volume out of the {image.GetDimension()}-D image of "
                        f"{image.GetNumberOfComponentsPerPixel()} components per voxel ({image.GetPixelIDTypeAsString()}"
                        f"): {str(error).strip().splitlines()[-1]}") from None
    return check_image(image, path), series


def read_header(path: str | os.PathLike) -> dict:
    """Geometry of an image file without reading its voxels: size, spacing, origin, direction, dimension."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise DataError(f"{path}: cannot read the image header (corrupt or not an image file)") from None
    return {"size": reader.GetSize(), "spacing": reader.GetSpacing(), "origin": reader.GetOrigin(),
            "direction": reader.GetDirection(), "dimension": reader.GetDimension()}


def write_image(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> None:
    """Write ``image`` atomically; the temporary name keeps the target's suffix so the format is right."""
    path = Path(path)
    name = path.name.lower()
    suffix = next((s for s in IMAGE_SUFFIXES if name.endswith(s)), None)
    if suffix is None:
        raise DataError(f"{path}: unsupported image suffix; expected one of {', '.join(IMAGE_SUFFIXES)}")
    with atomic_path(path, suffix=suffix) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=compress)


def read_png_label_stack(files: Sequence[Path], reference: sitk.Image,
                         grey_ranges: dict[tuple[int, int], int]) -> sitk.Image:
    """Stack 2-D PNG label slices onto ``reference``'s grid, mapping grey values to label ids.

    ``files[k]`` must be the slice with index k along the reference's third axis. A pixel whose grey
    value lies in one of the inclusive ``(low, high)`` ranges gets that range's label; others are
    background.
    """
    size = reference.GetSize()
    if len(files) != size[2]:
        raise DataError(f"{Path(files[0]).parent if files else '?'}: {len(files)} label slices for an image with "
                        f"{size[2]} slices")
    stack = np.zeros((size[2], size[1], size[0]), dtype=np.uint8)
    for index, file in enumerate(files):
        try:
            grey = sitk.GetArrayFromImage(sitk.ReadImage(str(file)))
        except RuntimeError:
            raise DataError(f"{file}: cannot read the PNG label slice") from None
        if grey.ndim == 3:  # RGB(A) saved slices: all channels carry the same grey value
            grey = grey[..., 0]
        if grey.shape != stack.shape[1:]:
            raise DataError(f"{file}: label slice is {grey.shape[::-1]} pixels, the image slice is {size[:2]}")
        for (low, high), label_id in grey_ranges.items():
            stack[index][(grey >= low) & (grey <= high)] = label_id
    label = sitk.GetImageFromArray(stack)
    label.CopyInformation(reference)
    return label
