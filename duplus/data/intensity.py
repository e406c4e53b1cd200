"""Body mask, foreground crop box and intensity normalisation (CT window / MRI-PET percentiles, then z-score).

Statistics are taken over the body mask so a cropped training case and an uncropped scan at inference agree.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from duplus.errors import DataError

CT_BODY_HU = -500.0
BODY_FRACTION_OF_P99 = 0.05
CROP_MARGIN = 2


def body_mask(array: np.ndarray, modality: str) -> np.ndarray:
    """Voxels inside the patient: above a modality threshold, largest components, holes filled per slice."""
    if modality == "CT":
        mask = array > CT_BODY_HU
    else:
        high = float(np.percentile(array, 99))
        low = float(array.min())
        mask = array > low + BODY_FRACTION_OF_P99 * (high - low)
    if not mask.any():
        return np.ones_like(mask)
    # Every step below only changes voxels inside the mask's bounding box (plus one voxel), so it runs on that box.
    box = _padded_box(mask)
    inner = mask[box]
    # Erosion counts the space beyond the array as background, so along an axis of one or two voxels
    # (a single-slice scan) it empties the mask and the statistics would fall back to the whole image,
    # air included: such axes are left out and the opening acts within the slice.
    axes = tuple(axis for axis in range(mask.ndim) if mask.shape[axis] >= 3)
    inner = _binary_opening_cross(inner, axes) if int(np.count_nonzero(inner)) > 1000 else inner
    labels, count = ndimage.label(inner)
    if count > 1:
        sizes = np.bincount(labels.ravel())[1:]
        # Keep the patient (and detached limbs), drop specks of noise and the scanner table.
        keep = np.zeros(count + 1, dtype=bool)
        keep[np.flatnonzero(sizes >= 0.1 * sizes.max()) + 1] = True
        inner = keep[labels]
    elif count == 0:
        return np.ones_like(mask)
    del labels
    # Lungs and bowel gas are inside the body: fill holes slice by slice (open at the scan ends in 3-D).
    result = np.zeros_like(mask)
    result[box] = _fill_holes_per_slice(inner)
    return result


def _padded_box(mask: np.ndarray) -> tuple[slice, ...]:
    """Slices of the bounding box of a non-empty ``mask``, grown by one voxel on each side (within the array)."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append(slice(max(0, int(hits[0]) - 1), min(mask.shape[axis], int(hits[-1]) + 2)))
    return tuple(box)


def _binary_opening_cross(mask: np.ndarray, axes: Sequence[int] | None = None) -> np.ndarray:
    """``ndimage.binary_opening(mask, iterations=1)`` (face-connected cross, zero border), by shifted ANDs and ORs.

    ``axes`` limits the cross to those axes (all by default): the opening with the cross of a lower dimension.
    """
    axes = tuple(range(mask.ndim)) if axes is None else tuple(axes)
    eroded = mask.copy()
    for axis in axes:
        low = [slice(None)] * mask.ndim
        high = [slice(None)] * mask.ndim
        low[axis], high[axis] = slice(None, -1), slice(1, None)
        eroded[tuple(high)] &= mask[tuple(low)]
        eroded[tuple(low)] &= mask[tuple(high)]
        # Outside the array counts as background, so the first and last slab along each axis erode away.
        first, last = [slice(None)] * mask.ndim, [slice(None)] * mask.ndim
        first[axis], last[axis] = 0, -1
        eroded[tuple(first)] = False
        eroded[tuple(last)] = False
    opened = eroded.copy()
    for axis in axes:
        low = [slice(None)] * mask.ndim
        high = [slice(None)] * mask.ndim
        low[axis], high[axis] = slice(None, -1), slice(1, None)
        opened[tuple(high)] |= eroded[tuple(low)]
        opened[tuple(low)] |= eroded[tuple(high)]
    return opened


# 4-connectivity within each (Y, X) slice and none across slices: per-slice hole filling in one labelling pass.
_IN_SLICE = np.zeros((3, 3, 3), dtype=bool)
_IN_SLICE[1] = ndimage.generate_binary_structure(2, 1)


def _fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """``ndimage.binary_fill_holes`` on every Z slice: background not 4-connected to the slice's edge is filled."""
    background, count = ndimage.label(~mask, structure=_IN_SLICE)
    if count == 0:
        return mask.copy()
    outside = np.zeros(count + 1, dtype=bool)
    for edge in (background[:, 0, :], background[:, -1, :], background[:, :, 0], background[:, :, -1]):
        outside[edge] = True
    outside[0] = False  # label 0 is the mask itself
    return ~outside[background]


def crop_box(mask: np.ndarray, label: np.ndarray | None = None, margin: int = CROP_MARGIN) -> list[list[int]]:
    """[[z0, z1], [y0, y1], [x0, x1]] (half-open) around ``mask`` and every labelled voxel, plus a margin."""
    region = mask if label is None else (mask | (label > 0))
    if not region.any():
        return [[0, int(n)] for n in mask.shape]
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(region.any(axis=other))
        box.append([max(0, int(hits[0]) - margin), min(mask.shape[axis], int(hits[-1]) + 1 + margin)])
    return box


def apply_box(array: np.ndarray, box: Sequence[Sequence[int]]) -> np.ndarray:
    """The sub-array inside ``box``."""
    return array[box[0][0]:box[0][1], box[1][0]:box[1][1], box[2][0]:box[2][1]]


def normalize(array: np.ndarray, mask: np.ndarray, modality: str, ct_window: Sequence[float],
              percentiles: Sequence[float]) -> tuple[np.ndarray, dict[str, Any]]:
    """Clip (CT: fixed HU window; MRI/PET: body percentiles) then z-score with body statistics."""
    # In float32, like the stored volume. Only intensities near float32's maximum, whose sums and
    # differences overflow to inf (the volume became NaN), are done again in float64: doing every
    # scan in float64 would double this step's memory and change every volume in its last digits.
    try:
        result, stats = _normalize_in(np.float32, array, mask, modality, ct_window, percentiles)
        if np.isfinite([*stats["clip"], stats["mean"], stats["std"]]).all() and np.isfinite(result).all():
            return result, stats
    except DataError:
        pass  # perhaps an overflow: the float64 pass tells a truly constant image from an overflowing one
    return _normalize_in(np.float64, array, mask, modality, ct_window, percentiles)


def _normalize_in(dtype: type, array: np.ndarray, mask: np.ndarray, modality: str, ct_window: Sequence[float],
                  percentiles: Sequence[float]) -> tuple[np.ndarray, dict[str, Any]]:
    values = (array[mask] if mask.any() else array.ravel()).astype(dtype, copy=False)
    if modality == "CT":
        low, high = float(ct_window[0]), float(ct_window[1])
        kind = "ct_window"
    else:
        low, high = (float(v) for v in np.percentile(values, [float(percentiles[0]), float(percentiles[1])]))
        kind = "percentiles"
    if not high > low:
        raise DataError(f"intensity clip range [{low:g}, {high:g}] is empty (constant image?)")
    clipped_values = np.clip(values, low, high)
    mean = float(clipped_values.mean())
    std = float(clipped_values.std())
    if std < 1e-6:
        raise DataError(f"image is constant inside the body after clipping to [{low:g}, {high:g}]")
    result = (np.clip(array.astype(dtype, copy=False), low, high).astype(dtype, copy=False) - dtype(mean)) / dtype(std)
    return result.astype(np.float32), {"kind": kind, "clip": [low, high], "mean": mean, "std": std,
                                       "percentiles": list(map(float, percentiles)) if kind == "percentiles" else None}
