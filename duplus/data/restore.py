"""Maps a preprocessed-grid array (label or probability) back onto the exact original image grid.

Undoes the crop (zero padding), the resampling and the reorientation recorded in a case's meta.
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
    dtype = np.uint8 if is_label else np.float32
    if is_label and array.size and (array.min() < 0 or array.max() > 255):
        raise DataError(f"label values must lie in 0..255, found {array.min()}..{array.max()}")
    full = np.zeros(tuple(int(s) for s in resampled["size"])[::-1], dtype=dtype)
    full[box[0][0]:box[0][1], box[1][0]:box[1][1], box[2][0]:box[2][1]] = array.astype(dtype)
    image = geo.image_from_array(full, resampled)
    target = {k: original[k] for k in ("size", "spacing", "origin", "direction")}
    pixel = sitk.sitkUInt8 if is_label else sitk.sitkFloat32
    restored = geo.resample(image, target, "nearest" if is_label else "linear", 0.0, pixel)
    # Resample writes the requested geometry; copy the recorded values verbatim so headers compare equal.
    restored.SetOrigin([float(o) for o in original["origin"]])
    restored.SetSpacing([float(s) for s in original["spacing"]])
    restored.SetDirection([float(d) for d in original["direction"]])
    return restored
