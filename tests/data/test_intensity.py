"""Body mask and intensity normalisation: statistics come from the patient, whatever the scan's thickness."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from duplus.data.intensity import _binary_opening_cross, body_mask
from duplus.data.preprocess import prepare_image


def _disc_scan(slices: int, tissue: float, air: float, magnitude: bool = False) -> sitk.Image:
    """``slices`` axial slices of a 126 mm disc of tissue in air (0.7 mm pixels, 5 mm slices);
    ``magnitude``: no negative values, as in an MR magnitude image."""
    yy, xx = np.mgrid[:256, :256]
    disc = (yy - 128) ** 2 + (xx - 128) ** 2 < 90**2
    values = np.where(disc, tissue, air)[None].repeat(slices, axis=0).astype(np.float32)
    values += np.random.default_rng(0).normal(0.0, 20.0, values.shape).astype(np.float32)
    image = sitk.GetImageFromArray(np.abs(values) if magnitude else values)
    image.SetSpacing((0.7, 0.7, 5.0))
    return image


@pytest.mark.parametrize("slices", [1, 2, 12])
def test_a_ct_scan_of_any_thickness_is_normalised_by_its_body(slices: int) -> None:
    """A single-slice scan used to lose its whole body mask to the 3-D opening (every voxel lies on
    the first and last slab along Z), and was z-scored over the air too: body mean -593 HU, not 40."""
    _, meta = prepare_image(_disc_scan(slices, tissue=40.0, air=-1000.0), "CT", None, crop=True)
    stats = meta["normalization"]
    assert stats["mean"] == pytest.approx(40.0, abs=10.0)
    assert stats["std"] < 60.0
    # Cropped to the 126 mm disc (84 voxels of 1.5 mm, plus the margin), not kept at the 179 mm field of view.
    assert [b[1] - b[0] for b in meta["crop_box"][1:]] == [88, 88]


def test_a_single_slice_mri_is_clipped_at_its_body_percentiles() -> None:
    _, meta_one = prepare_image(_disc_scan(1, tissue=500.0, air=5.0, magnitude=True), "MRI", None)
    _, meta_many = prepare_image(_disc_scan(12, tissue=500.0, air=5.0, magnitude=True), "MRI", None)
    assert meta_one["normalization"]["mean"] == pytest.approx(meta_many["normalization"]["mean"], abs=10.0)
    assert meta_one["normalization"]["clip"][0] > 250.0  # the 2nd body percentile is tissue, not air


@pytest.mark.parametrize("axes", [(0, 1, 2), (1, 2), (0, 2)])
def test_opening_equals_scipy_with_the_cross_of_those_axes(axes) -> None:
    mask = np.random.default_rng(1).random((9, 14, 17)) > 0.35
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1, 1, 1] = True
    for axis in axes:
        index = [1, 1, 1]
        for offset in (0, 2):
            index[axis] = offset
            structure[tuple(index)] = True
    expected = ndimage.binary_opening(mask, structure=structure)
    assert np.array_equal(_binary_opening_cross(mask, axes), expected)
    if axes == (0, 1, 2):
        assert np.array_equal(_binary_opening_cross(mask), expected)


def test_body_mask_of_a_single_slice_is_the_body() -> None:
    array = sitk.GetArrayFromImage(_disc_scan(1, tissue=40.0, air=-1000.0))
    mask = body_mask(array, "CT")
    truth = array > -500.0
    assert 0.99 < mask.sum() / truth.sum() < 1.01
