"""Maps a preprocessed-grid array (label or probability) back onto the exact original image grid.

Undoes the crop (zero padding), the resampling and the reorientation recorded in a case's meta.
``restore_levels`` turns one class's probability levels into its mask there, interpolating only
inside the region the mask can reach, so a small organ costs little on a large scan.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import SimpleITK as sitk

from duplus.data import geometry as geo
from duplus.errors import DataError


def restore_to_original(array: np.ndarray, meta: Mapping[str, Any], is_label: bool) -> sitk.Image:
    """Return ``array`` (Z, Y, X on the preprocessed grid) as an image on the original grid.

    Labels are resampled with nearest neighbour (uint8 out), probabilities linearly (float32 out).
    The result has the original size, spacing, origin and direction exactly.
    """
    array = np.asarray(array)
    box, resampled, original = _grids(array, meta)
    dtype = np.uint8 if is_label else np.float32
    if is_label and array.size and (array.min() < 0 or array.max() > 255):
        raise DataError(f"label values must lie in 0..255, found {array.min()}..{array.max()}")
    full = np.zeros(tuple(int(s) for s in resampled["size"])[::-1], dtype=dtype)
    full[box[0][0]:box[0][1], box[1][0]:box[1][1], box[2][0]:box[2][1]] = array.astype(dtype)
    image = geo.image_from_array(full, resampled)
    target = {k: original[k] for k in ("size", "spacing", "origin", "direction")}
    pixel = sitk.sitkUInt8 if is_label else sitk.sitkFloat32
    restored = geo.resample(image, target, "nearest" if is_label else "linear", 0.0, pixel)
    return _with_original_header(restored, original)


def restore_levels(levels: np.ndarray, meta: Mapping[str, Any], level_cut: float) -> sitk.Image:
    """One class's mask (uint8 0/1) on the original grid from its levels (Z, Y, X) on the preprocessed grid.

    The levels are interpolated linearly and thresholded at ``level_cut`` on the original grid, as
    ``restore_to_original(levels, meta, is_label=False) > level_cut`` would, but only over the part
    of the grid near the mask's box: beyond its boundary levels every interpolation corner is
    outside, so nothing there can pass the threshold.
    """
    levels = np.asarray(levels)
    box, resampled, original = _grids(levels, meta)
    size = tuple(int(s) for s in original["size"])
    full = np.zeros(size[::-1], dtype=np.uint8)
    inside = np.argwhere(levels > level_cut)
    if len(inside):
        # The mask's box two voxels wider, in the uncropped resampled grid (Z, Y, X): its boundary levels,
        # then zeros, so the interpolation at the crop's edge sees what it would see on the whole grid.
        offset = np.array([int(b[0]) for b in box])
        grid = np.array([int(s) for s in resampled["size"]])[::-1]
        low = np.maximum(inside.min(axis=0) + offset - 2, 0)
        high = np.minimum(inside.max(axis=0) + offset + 3, grid)
        crop = np.zeros(tuple(high - low), dtype=np.float32)
        lo, hi = np.maximum(low, offset), np.minimum(high, offset + np.array(levels.shape))
        crop[tuple(map(slice, lo - low, hi - low))] = levels[tuple(map(slice, lo - offset, hi - offset))]
        start = _frame(resampled).TransformIndexToPhysicalPoint([int(v) for v in low[::-1]])
        cropped = geo.image_from_array(crop, {**resampled, "size": list(crop.shape[::-1]), "origin": list(start)})
        # Original-grid voxels that can see the crop: its corners one voxel further out, mapped back.
        frame = _frame(original)
        where = np.array([frame.TransformPhysicalPointToContinuousIndex(
            cropped.TransformContinuousIndexToPhysicalPoint((float(x), float(y), float(z))))
            for x in (-1, crop.shape[2]) for y in (-1, crop.shape[1]) for z in (-1, crop.shape[0])])
        first = np.clip(np.floor(where.min(axis=0)).astype(int) - 1, 0, np.array(size) - 1)
        last = np.clip(np.ceil(where.max(axis=0)).astype(int) + 1, 0, np.array(size) - 1)
        target = {"size": (last - first + 1).tolist(), "spacing": original["spacing"],
                  "origin": list(frame.TransformIndexToPhysicalPoint(first.tolist())), "direction": original["direction"]}
        values = geo.resample(cropped, target, "linear", 0.0, sitk.sitkFloat32)
        full[first[2]:last[2] + 1, first[1]:last[1] + 1, first[0]:last[0] + 1] = (
            sitk.GetArrayViewFromImage(values) > level_cut)
    return geo.image_from_array(full, original)


def _grids(array: np.ndarray, meta: Mapping[str, Any]) -> tuple[Any, Mapping[str, Any], Mapping[str, Any]]:
    try:
        box = meta["crop_box"]
        resampled = meta["resampled"]
        original = meta["original"]
    except KeyError as error:
        raise DataError(f"meta lacks {error}; expected the meta.json written by preprocessing") from None
    expected = tuple(int(b[1]) - int(b[0]) for b in box)
    if array.ndim != 3 or tuple(array.shape) != expected:
        raise DataError(f"array of shape {tuple(array.shape)} does not match the preprocessed case shape {expected} "
                        f"(Z, Y, X); restore one class at a time")
    return box, resampled, original


def _frame(geometry: Mapping[str, Any]) -> sitk.Image:
    """A one-voxel image carrying ``geometry``'s origin, spacing and direction: SimpleITK's index and
    physical-point transforms, without allocating the grid."""
    return geo.empty_image({**geometry, "size": [1, 1, 1]}, sitk.sitkUInt8)


def _with_original_header(image: sitk.Image, original: Mapping[str, Any]) -> sitk.Image:
    # Resample writes the requested geometry; copy the recorded values verbatim so headers compare equal.
    image.SetOrigin([float(o) for o in original["origin"]])
    image.SetSpacing([float(s) for s in original["spacing"]])
    image.SetDirection([float(d) for d in original["direction"]])
    return image
