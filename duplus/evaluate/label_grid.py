"""The grid a case is scored on: its label's own, which need not be the image's.

HECKTOR ships the PET image (~4 mm) with the ground truth drawn on the CT grid (~1 mm). Training sees
that label resampled from its own grid onto the training grid, but a copy of it on the PET grid would
lose or change the size of a small lymph node, and the challenge scores on the CT-resolution truth.
So a case whose label lies on another grid is scored there: the prediction is restored onto the
label's grid (in patient space, as onto the image's) and compared with the label file as drawn, with
the label grid's spacing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def label_geometry(path: str | Path) -> dict[str, Any]:
    """Size, spacing, origin and direction of a label file, read from its header alone."""
    from duplus.data.image_io import read_header

    header = read_header(path)
    return {key: list(header[key]) for key in ("size", "spacing", "origin", "direction")}


def scoring_meta(meta: Mapping[str, Any], label_grid: Mapping[str, Any]) -> Mapping[str, Any]:
    """``meta`` itself when the label lies on the image's grid, else a copy whose original grid is the label's.

    "The image's grid" is judged with the tolerance the integrity check allows a label of the usual
    layout, so those datasets keep exactly the path they had. A meta without an original grid is
    returned as it is (the restore itself reports what it lacks).
    """
    from duplus.data.integrity import grid_mismatch

    original = meta.get("original")
    if original is None or not grid_mismatch(original, label_grid):
        return meta
    return {**meta, "original": {**original, **{key: list(label_grid[key])
                                                for key in ("size", "spacing", "origin", "direction")}}}


def image_field_of_view(image_grid: Mapping[str, Any], label_grid: Mapping[str, Any]) -> np.ndarray:
    """Bool (Z, Y, X) on the label's grid: the voxels whose centre lies inside the image's voxels.

    The preprocessed grid reaches up to one target voxel past the scan (its edge voxels repeated,
    ``geometry.with_edge_margin``), so a restored mask can spill past the field of view; the scan
    shows nothing there, so those label-grid voxels are background.
    """
    import SimpleITK as sitk

    from duplus.data import geometry as geo

    ones = geo.empty_image(image_grid, sitk.sitkUInt8) + 1
    # Nearest neighbour counts a point inside up to half a voxel past the outer centres: the voxels' extent.
    inside = geo.resample(ones, dict(label_grid), "nearest", 0.0, sitk.sitkUInt8)
    return sitk.GetArrayViewFromImage(inside).astype(bool)


def label_on_image_grid(path: str | Path, image_grid: Mapping[str, Any]) -> np.ndarray:
    """The label file resampled (nearest neighbour) onto the image's grid: the picture of an example, never a score."""
    import SimpleITK as sitk

    from duplus.data import geometry as geo
    from duplus.data.image_io import read_image

    label = read_image(path)
    return sitk.GetArrayFromImage(geo.resample(label, dict(image_grid), "nearest", 0.0, label.GetPixelID()))
