"""Image grids: reorientation to LPS, the resampled target grid, resampling, and JSON-friendly geometry records.

Both preprocessing and the restore step use these, so a prediction maps back onto exactly the original grid.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk

from duplus.errors import DataError

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
INTERPOLATORS = {"nearest": sitk.sitkNearestNeighbor, "linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline}


def orientation_code(image: sitk.Image) -> str:
    """Three-letter DICOM orientation code of ``image`` (``LPS`` for the identity direction)."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def geometry_of(image: sitk.Image) -> dict[str, Any]:
    """Size, spacing, origin and direction of ``image`` as plain lists (for meta.json)."""
    return {"size": [int(s) for s in image.GetSize()], "spacing": [float(s) for s in image.GetSpacing()],
            "origin": [float(o) for o in image.GetOrigin()], "direction": [float(d) for d in image.GetDirection()]}


def empty_image(geometry: dict[str, Any], pixel: int) -> sitk.Image:
    """A zero image on ``geometry``."""
    image = sitk.Image([int(s) for s in geometry["size"]], pixel)
    image.SetSpacing([float(s) for s in geometry["spacing"]])
    image.SetOrigin([float(o) for o in geometry["origin"]])
    image.SetDirection([float(d) for d in geometry["direction"]])
    return image


def image_from_array(array: np.ndarray, geometry: dict[str, Any]) -> sitk.Image:
    """Wrap a (Z, Y, X) array as an image on ``geometry``; the shape must match its size."""
    expected = tuple(int(s) for s in geometry["size"])[::-1]
    if tuple(array.shape) != expected:
        raise DataError(f"array of shape {tuple(array.shape)} does not fit grid of shape {expected} (Z, Y, X)")
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in geometry["spacing"]])
    image.SetOrigin([float(o) for o in geometry["origin"]])
    image.SetDirection([float(d) for d in geometry["direction"]])
    return image


def reorient_lps(image: sitk.Image) -> sitk.Image:
    """Permute / flip axes so the direction is (close to) identity, i.e. LPS; voxel values are untouched."""
    return sitk.DICOMOrient(image, "LPS")


# The most voxels a resampled grid may have: 4 GiB as float32, far above a whole-body CT at 1 mm.
MAX_GRID_VOXELS = 2**30
# The longest field of view along an axis: a whole-body scan is about 2 m; 3 voxels of 1e4 mm is not a body.
MAX_EXTENT_MM = 5000.0


def target_grid(image: sitk.Image, spacing: Sequence[float]) -> dict[str, Any]:
    """The identity-direction grid with ``spacing`` (x, y, z mm) that covers ``image``.

    For an axis-aligned image this starts at the first voxel centre after reorientation, so a target
    spacing equal to the image's own gives exactly the same voxel centres (a lossless resampling).
    """
    size = np.array(image.GetSize())
    old = np.array(image.GetSpacing())
    new = np.array([float(s) for s in spacing])
    if new.shape != (3,) or np.any(new <= 0):
        raise DataError(f"preprocess.spacing: expected three positive numbers (x, y, z mm), got {list(spacing)}")
    direction = np.array(image.GetDirection()).reshape(3, 3)
    if np.allclose(direction, np.eye(3), atol=1e-6):
        origin = np.array(image.GetOrigin())
        # Enough voxels that the last original voxel centre lies inside the new grid: with
        # round(size * old / new), 100 slices of 0.8 mm became 53 of 1.5 mm, whose last voxel ends
        # at 78.75 mm, before the last original centre (79.2 mm), and a restored mask lost that slice.
        extent = (size - 1) * old
        new_size = np.ceil(extent / new - 1e-6) + 1
    else:
        # Oblique acquisitions: the bounding box of the voxel centres in patient space.
        corners = np.array([image.TransformContinuousIndexToPhysicalPoint([float(c[i] * (size[i] - 1))
                                                                           for i in range(3)])
                            for c in np.ndindex(2, 2, 2)])
        origin = corners.min(axis=0)
        extent = corners.max(axis=0) - origin
        new_size = np.round(extent / new) + 1
    # A header's spacing of 1e4 mm or more (or a huge size) spans metres: the grid would ask for
    # more memory than any scan needs, and int() of 1e30 voxels wraps to a nonsense size.
    if (not np.isfinite(new_size).all() or float(np.max(extent)) > MAX_EXTENT_MM
            or float(np.prod(np.maximum(new_size, 1))) > MAX_GRID_VOXELS):
        raise DataError(f"the image spans {[round(float(e), 3) for e in extent]} mm (size {list(size)}, spacing "
                        f"{list(old)} mm): over {MAX_EXTENT_MM:g} mm along an axis or {MAX_GRID_VOXELS:.3g} voxels on "
                        f"a {list(new)} mm grid, more than any scan; check the header's spacing")
    new_size = np.maximum(1, new_size.astype(int))
    return {"size": [int(s) for s in new_size], "spacing": [float(s) for s in new],
            "origin": [float(o) for o in origin], "direction": list(IDENTITY)}


# Voxels repeated beyond each face at most: a 1.5 mm grid over 0.1 mm voxels needs 15; a header
# with a micrometre spacing would otherwise ask for millions.
MAX_EDGE_MARGIN = 32


def with_edge_margin(image: sitk.Image, spacing: Sequence[float]) -> sitk.Image:
    """``image`` with its outer voxels repeated for one target voxel (``spacing``, mm) beyond each face.

    ``target_grid`` sizes its grid so that every voxel centre lies inside it, so the grid's last
    point can lie up to a target voxel past the last centre: outside the image, where resampling
    would write the padding value (air), and a structure touching the field of view would lose
    its edge voxels when a mask predicted there is restored. Physical positions are unchanged.
    """
    reach = [min(int(math.ceil(float(new) / float(old))), MAX_EDGE_MARGIN) if old > 0 else 1
             for new, old in zip(spacing, image.GetSpacing())]
    return sitk.ZeroFluxNeumannPad(image, reach, reach)


def resample(image: sitk.Image, geometry: dict[str, Any], interpolation: str, default: float = 0.0,
             pixel: int | None = None) -> sitk.Image:
    """Resample ``image`` onto ``geometry`` in patient space (identity transform)."""
    if interpolation not in INTERPOLATORS:
        raise DataError(f"interpolation '{interpolation}' is not one of {', '.join(INTERPOLATORS)}")
    pixel = image.GetPixelID() if pixel is None else pixel
    return sitk.Resample(image, [int(s) for s in geometry["size"]], sitk.Transform(), INTERPOLATORS[interpolation],
                         [float(o) for o in geometry["origin"]], [float(s) for s in geometry["spacing"]],
                         [float(d) for d in geometry["direction"]], float(default), pixel)
