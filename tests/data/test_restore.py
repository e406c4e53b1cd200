"""Restore to the original grid: exact when the spacing is unchanged, Dice >= 0.95 after resampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from data_helpers import make_volume

from duplus.data.layouts import Case, read_case
from duplus.data.preprocess import prepare_image, settings, transform_case
from duplus.data.restore import restore_to_original
from duplus.errors import DataError


def _case(demo_raw: Path, case: str) -> tuple[sitk.Image, sitk.Image]:
    root = demo_raw / "demo_abdomen_ct"
    image, label = read_case(Case(case, root / "imagesTr" / f"{case}.nii.gz", root / "labelsTr" / f"{case}.nii.gz",
                                  "x"))
    assert label is not None
    return image, label


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("case", ["abdct_siteA_000", "abdct_siteB_000"])
def test_label_round_trip_is_exact_at_the_original_spacing(demo_raw: Path, case: str) -> None:
    image, label = _case(demo_raw, case)
    options = settings({"preprocess": {"spacing": list(image.GetSpacing())}})
    _, label_array, meta = transform_case(image, label, "CT", options, crop=True)
    restored = restore_to_original(label_array, meta, is_label=True)
    assert restored.GetSize() == label.GetSize()
    assert restored.GetSpacing() == label.GetSpacing() and restored.GetOrigin() == label.GetOrigin()
    assert restored.GetDirection() == label.GetDirection()
    assert np.array_equal(sitk.GetArrayFromImage(restored), sitk.GetArrayFromImage(label))


@pytest.mark.parametrize("case", ["abdct_siteA_001", "abdct_siteB_001"])
def test_label_round_trip_after_resampling_keeps_organ_dice(demo_raw: Path, case: str) -> None:
    image, label = _case(demo_raw, case)
    options = settings({"preprocess": {"spacing": [3.5, 3.5, 3.5]}})
    _, label_array, meta = transform_case(image, label, "CT", options, crop=True)
    assert meta["crop_box"] != [[0, n] for n in meta["resampled"]["size"][::-1]]
    restored = sitk.GetArrayFromImage(restore_to_original(label_array, meta, is_label=True))
    original = sitk.GetArrayFromImage(label)
    for organ in (1, 2, 3, 4):
        assert _dice(restored == organ, original == organ) >= 0.95, organ


def test_prepare_image_and_probability_restore(demo_raw: Path) -> None:
    image, label = _case(demo_raw, "abdct_siteB_000")
    config = {"preprocess": {"spacing": list(image.GetSpacing())}}
    array, meta = prepare_image(image, "CT", config)
    assert array.dtype == np.float32 and list(array.shape) == meta["resampled"]["size"][::-1]  # no crop
    # A probability map on the preprocessed grid comes back (linearly) on the original grid.
    _, label_array, _ = transform_case(image, label, "CT", settings(config), crop=False)
    probability = (label_array == 1).astype(np.float32) * 0.9
    restored = restore_to_original(probability, meta, is_label=False)
    assert restored.GetPixelID() == sitk.sitkFloat32
    back = sitk.GetArrayFromImage(restored)
    assert np.array_equal(back > 0.5, sitk.GetArrayFromImage(label) == 1)
    assert np.isclose(back.max(), 0.9)


def test_prepare_image_matches_training_normalisation(demo_raw: Path) -> None:
    image, label = _case(demo_raw, "abdct_siteA_000")
    config = {"preprocess": {"spacing": [4.0, 4.0, 4.0]}}
    uncropped, meta_a = prepare_image(image, "CT", config)
    cropped, _, meta_b = transform_case(image, label, "CT", settings(config), crop=True)
    # Statistics come from the body, so cropping away air does not change the normalised values.
    assert np.isclose(meta_a["normalization"]["mean"], meta_b["normalization"]["mean"], rtol=1e-4)
    box = meta_b["crop_box"]
    assert np.allclose(uncropped[box[0][0]:box[0][1], box[1][0]:box[1][1], box[2][0]:box[2][1]], cropped, atol=1e-4)


def test_oblique_image_round_trip_keeps_dice() -> None:
    angle = np.deg2rad(20)
    direction = (np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle), 0, 0, 0, 1)
    image, label = make_volume(shape_zyx=(16, 24, 24), spacing=(1.5, 1.5, 2.0), direction=direction)
    options = settings({"preprocess": {"spacing": [1.0, 1.0, 1.0]}})
    _, label_array, meta = transform_case(image, label, "CT", options, crop=True)
    restored = sitk.GetArrayFromImage(restore_to_original(label_array, meta, is_label=True))
    assert _dice(restored > 0, sitk.GetArrayFromImage(label) > 0) >= 0.95


def test_shape_mismatch_is_refused(demo_raw: Path) -> None:
    image, label = _case(demo_raw, "abdct_siteA_000")
    _, label_array, meta = transform_case(image, label, "CT", settings({}), crop=True)
    with pytest.raises(DataError, match="does not match the preprocessed case shape"):
        restore_to_original(label_array[:-1], meta, is_label=True)


def test_the_last_original_slice_survives_resampling_and_restore() -> None:
    # 100 slices of 0.8 mm at 1.5 mm: the grid must reach the last original voxel centre (79.2 mm);
    # rounding 100 * 0.8 / 1.5 gave 53 slices ending at 78.75 mm and an empty restored last slice.
    label = sitk.GetImageFromArray(np.ones((100, 12, 12), np.uint8))
    label.SetSpacing((1.0, 1.0, 0.8))
    ramp = np.broadcast_to(np.linspace(-400.0, 400.0, 12, dtype=np.float32), (100, 12, 12))
    image = sitk.GetImageFromArray(np.ascontiguousarray(ramp))
    image.CopyInformation(label)
    options = settings({"preprocess": {"spacing": [1.0, 1.0, 1.5]}})
    _, label_array, meta = transform_case(image, label, "CT", options, crop=False)
    restored = sitk.GetArrayFromImage(restore_to_original(label_array, meta, is_label=True))
    assert restored.shape == (100, 12, 12)
    assert restored.all(), f"slices lost: {np.flatnonzero(~restored.all(axis=(1, 2))).tolist()}"


@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), (-1, 0, 0, 0, 1, 0, 0, 0, -1)])
def test_tissue_touching_the_field_of_view_keeps_its_edge_voxels(direction) -> None:
    """The coarse grid reaches past the last voxel centre; there it must see the edge, not air.

    Tissue fills the scan but five air columns; a mask of "not air" predicted on the 6 mm grid and
    restored must cover every tissue voxel up to the far faces (before, the last 3 slices and
    the last 2 columns came back empty).
    """
    values = np.random.default_rng(0).normal(40.0, 10.0, (12, 50, 107)).astype(np.float32)
    values[:, :, :5] = -1000.0
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((1.0, 1.0, 1.0))
    image.SetDirection(direction)
    array, meta = prepare_image(image, "CT", {"preprocess": {"spacing": [6.0, 6.0, 6.0]}})
    tissue = (array > array.min() + 1e-3).astype(np.uint8)
    restored = sitk.GetArrayFromImage(restore_to_original(tissue, meta, is_label=True)).astype(bool)
    truth = values > -500
    away_from_air = truth.copy()
    away_from_air[:, :, :11] = False  # the air/tissue border blurs at 6 mm; the far faces must not
    assert restored[away_from_air].all(), f"{int((~restored & away_from_air).sum())} tissue voxels restored as air"
    assert _dice(restored, truth) > 0.97
