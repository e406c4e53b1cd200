"""Integrity check: every problem of a dataset is reported at once, each naming its case and file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from data_helpers import make_volume, user_config

from duplus.data.integrity import check_cases
from duplus.data.layouts import list_cases
from duplus.data.registry import get_dataset
from duplus.errors import IntegrityError


def _write(image: sitk.Image, path: Path) -> None:
    sitk.WriteImage(image, str(path))


def _break(root: Path) -> dict[str, str]:
    """Damage cases 1..6 of an MSD folder in six different ways; returns case -> expected message fragment."""
    image, label = make_volume(seed=1)
    moved = sitk.Image(label)
    moved.SetOrigin((0.0, 0.0, 0.0))
    _write(moved, root / "labelsTr" / "case01.nii.gz")
    array = sitk.GetArrayFromImage(label).astype(np.float32)
    array[0, 0, 0] = 0.5  # an intensity image, not a label map
    bad = sitk.GetImageFromArray(array)
    bad.CopyInformation(label)
    _write(bad, root / "labelsTr" / "case02.nii.gz")
    values = sitk.GetArrayFromImage(image).astype(np.float32)
    values[2, 2, 2] = np.nan
    nan = sitk.GetImageFromArray(values)
    nan.CopyInformation(image)
    _write(nan, root / "imagesTr" / "case03.nii.gz")
    _write(sitk.JoinSeries([image, image]), root / "imagesTr" / "case04.nii.gz")
    (root / "labelsTr" / "case05.nii.gz").unlink()
    constant = sitk.Image(image.GetSize(), sitk.sitkInt16)
    constant.CopyInformation(image)
    _write(constant, root / "imagesTr" / "case06.nii.gz")
    return {"case01": "origin", "case02": "non-integer values", "case03": "NaN", "case04": "4-D", "case05": "not found",
            "case06": "constant"}


@pytest.mark.parametrize("threads", [1, 2])
def test_all_problems_are_listed_by_case_and_file(msd_folder, threads: int) -> None:
    root = msd_folder(n=7)
    expected = _break(root)
    spec = get_dataset("mydata", user_config(root))
    with pytest.raises(IntegrityError) as caught:
        check_cases("mydata", list_cases(spec, root), threads=threads)
    message = str(caught.value)
    assert "6 problem(s) in 7 cases" in message
    lines = {line.strip().split(":")[0]: line for line in message.splitlines()[1:]}
    for case, fragment in expected.items():
        assert f"case {case}" in lines, case
        assert fragment in lines[f"case {case}"], (case, lines[f"case {case}"])
        assert f"{case}.nii.gz" in lines[f"case {case}"]
    assert "case case00" not in message


def test_spacing_and_direction_mismatch_are_reported(msd_folder) -> None:
    root = msd_folder(n=2)
    _, label = make_volume(seed=0)
    stretched = sitk.Image(label)
    stretched.SetSpacing((2.0, 2.0, 3.5))
    _write(stretched, root / "labelsTr" / "case00.nii.gz")
    flipped = sitk.Image(make_volume(seed=1)[1])
    flipped.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))
    _write(flipped, root / "labelsTr" / "case01.nii.gz")
    spec = get_dataset("mydata", user_config(root))
    with pytest.raises(IntegrityError) as caught:
        check_cases("mydata", list_cases(spec, root))
    assert "case case00" in str(caught.value) and "spacing" in str(caught.value)
    assert "case case01" in str(caught.value) and "direction" in str(caught.value)


def test_clean_dataset_passes(msd_folder) -> None:
    root = msd_folder(n=3)
    spec = get_dataset("mydata", user_config(root))
    assert check_cases("mydata", list_cases(spec, root)) == 3


def test_geometry_mismatch_reads_as_plain_numbers():
    import SimpleITK as sitk

    from duplus.data.integrity import geometry_mismatch

    image, label = sitk.Image(4, 4, 4, sitk.sitkUInt8), sitk.Image(4, 4, 4, sitk.sitkUInt8)
    label.SetOrigin((-143.4, 2.0, 3.0))
    assert geometry_mismatch(image, label) == ["origin (-143.4, 2, 3) != image origin (0, 0, 0)"]


def test_an_image_given_as_the_label_is_reported_in_one_short_line(msd_folder) -> None:
    # Swapped image/label paths are a common slip; the report must stay readable for every case.
    root = msd_folder(n=2)
    image, _ = make_volume(seed=0)
    ramp = np.arange(np.prod(sitk.GetArrayViewFromImage(image).shape), dtype=np.int16).reshape(
        sitk.GetArrayViewFromImage(image).shape) + 1000
    as_label = sitk.GetImageFromArray(ramp)
    as_label.CopyInformation(image)
    _write(as_label, root / "labelsTr" / "case00.nii.gz")
    spec = get_dataset("mydata", user_config(root))
    with pytest.raises(IntegrityError) as caught:
        check_cases("mydata", list_cases(spec, root))
    (line,) = [line for line in str(caught.value).splitlines() if "case case00" in line]
    assert len(line) < 500
    assert "case00.nii.gz" in line and "1000, 1001" in line and f"{ramp.max()}" in line
    assert f"{ramp.size} distinct values" in line and "intensity image given as the label" in line


def test_label_values_the_config_does_not_declare_are_background_not_a_problem(msd_folder) -> None:
    # An atlas holds many more regions than a run names: those values are background.
    root = msd_folder(n=2)
    _, label = make_volume(seed=0)
    array = sitk.GetArrayFromImage(label)
    array[0, :2, :2] = 117
    array[1, :2, :2] = 43
    atlas = sitk.GetImageFromArray(array)
    atlas.CopyInformation(label)
    _write(atlas, root / "labelsTr" / "case00.nii.gz")
    spec = get_dataset("mydata", user_config(root))
    assert check_cases("mydata", list_cases(spec, root)) == 2


@pytest.mark.parametrize("kind", ["negative", "thousands"])
def test_an_integer_intensity_image_as_the_label_is_still_refused(msd_folder, kind: str) -> None:
    root = msd_folder(n=2)
    image, _ = make_volume(seed=0)
    shape = sitk.GetArrayViewFromImage(image).shape
    if kind == "negative":  # a CT in HU: air at -1000
        values = np.full(shape, -1000, dtype=np.int16)
        values[2:5] = 40
    else:  # an unsigned MRI: every grey value its own "label"
        values = (np.arange(np.prod(shape)) % 3000).reshape(shape).astype(np.uint16)
    as_label = sitk.GetImageFromArray(values)
    as_label.CopyInformation(image)
    _write(as_label, root / "labelsTr" / "case01.nii.gz")
    spec = get_dataset("mydata", user_config(root))
    with pytest.raises(IntegrityError, match=r"case case01: label .*case01\.nii\.gz holds .*an intensity image "
                                             r"given as the label"):
        check_cases("mydata", list_cases(spec, root))
