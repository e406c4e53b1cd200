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
    mask = ndimage.binary_opening(mask, iterations=1) if mask.sum() > 1000 else mask
    labels, count = ndimage.label(mask)
    if count > 1:
        sizes = np.bincount(labels.ravel())[1:]
        # Keep the patient (and detached limbs), drop specks of noise and the scanner table.
        keep = np.flatnonzero(sizes >= 0.1 * sizes.max()) + 1
        mask = np.isin(labels, keep)
    elif count == 0:
        return np.ones_like(mask)
    # Lungs and bowel gas are inside the body: fill holes slice by slice (open at the scan ends in 3-D).
    for z in range(mask.shape[0]):
        mask[z] = ndimage.binary_fill_holes(mask[z])
    return mask


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
    values = array[mask] if mask.any() else array.ravel()
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
    result = (np.clip(array, low, high).astype(np.float32) - np.float32(mean)) / np.float32(std)
    return result.astype(np.float32), {"kind": kind, "clip": [low, high], "mean": mean, "std": std,
                                       "percentiles": list(map(float, percentiles)) if kind == "percentiles" else None}
