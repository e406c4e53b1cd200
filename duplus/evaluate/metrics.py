"""Per-class segmentation metrics with MONAI: Dice, 95th-percentile Hausdorff (mm), normalised surface Dice.

Conventions for empty masks: both empty -> dice 1, hd95 0, nsd 1; exactly one empty -> dice 0,
hd95 NaN (a distance to nothing is undefined; tables average it with nanmean), nsd 0.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

from duplus.errors import DataError

# Voxels kept around the union of both masks when cropping before distance transforms: surfaces
# must not touch the crop border, and one voxel is enough for that; two is a safety margin.
CROP_MARGIN = 2


def _crop_to_union(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Surface distances depend only on the masks' surfaces, so cropping a mostly empty
    # original-resolution volume to the masks' bounding box gives identical results, much faster.
    union = pred | truth
    slices = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        hits = np.flatnonzero(union.any(axis=other))
        start, stop = max(int(hits[0]) - CROP_MARGIN, 0), min(int(hits[-1]) + 1 + CROP_MARGIN, union.shape[axis])
        slices.append(slice(start, stop))
    index = tuple(slices)
    return pred[index], truth[index]


def _pad(mask: np.ndarray) -> np.ndarray:
    # A mask touching the volume border needs a background rim for its surface to be closed.
    return np.pad(mask, CROP_MARGIN)


def class_metrics(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], nsd_tolerance_mm: float) -> dict[str, float]:
    """Dice, hd95 (mm) and NSD of one binary mask pair (same shape, ``spacing`` per array axis)."""
    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    has_pred, has_truth = bool(pred.any()), bool(truth.any())
    if not has_pred and not has_truth:
        return {"dice": 1.0, "hd95": 0.0, "nsd": 1.0}
    if not has_pred or not has_truth:
        return {"dice": 0.0, "hd95": math.nan, "nsd": 0.0}
    p = torch.from_numpy(pred)[None, None].float()
    t = torch.from_numpy(truth)[None, None].float()
    dice = float(compute_dice(p, t, include_background=True, ignore_empty=False)[0, 0])
    cp, ct = _crop_to_union(pred, truth)
    cp, ct = _pad(cp), _pad(ct)
    p = torch.from_numpy(cp)[None, None].float()
    t = torch.from_numpy(ct)[None, None].float()
    spacing = [float(s) for s in spacing]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about empty masks, which were handled above
        hd95 = float(compute_hausdorff_distance(p, t, include_background=True, percentile=95, spacing=spacing)[0, 0])
        nsd = float(
            compute_surface_dice(p, t, class_thresholds=[float(nsd_tolerance_mm)], include_background=True, spacing=spacing)[0, 0]
        )
    return {"dice": dice, "hd95": hd95, "nsd": nsd}


def case_metrics(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float],
    class_names: Sequence[str] | None = None,
    nsd_tolerance_mm: float = 2.0,
) -> list[dict[str, float | str]]:
    """One dict ``{class, dice, hd95, nsd}`` per class of bool masks ``pred``, ``truth`` [K, *spatial].

    ``spacing`` is in mm per spatial array axis, in array order (for a SimpleITK array:
    ``reversed(image.GetSpacing())``).
    """
    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise DataError(f"prediction {pred.shape} and ground truth {truth.shape} differ in shape")
    if len(spacing) != pred.ndim - 1:
        raise DataError(f"spacing {tuple(spacing)} must give one value per spatial axis of {pred.shape[1:]}")
    names = list(class_names) if class_names is not None else [f"class_{k}" for k in range(pred.shape[0])]
    if len(names) != pred.shape[0]:
        raise DataError(f"{len(names)} class names for {pred.shape[0]} mask channels")
    return [{"class": name, **class_metrics(pred[k], truth[k], spacing, nsd_tolerance_mm)} for k, name in enumerate(names)]
