"""Image reading and writing: formats, DICOM series, 4-D volumes and every kind of bad input."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from data_helpers import make_volume, write_dicom_series

from duplus.data.image_files import image_files
from duplus.data.image_io import read_image, read_image_files, write_image
from duplus.errors import DataError
from duplus.hashing import sha256_files


def test_nifti_nrrd_mha_round_trip_geometry(tmp_path: Path) -> None:
    image, _ = make_volume(direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))
    for suffix in (".nii.gz", ".nrrd", ".mha"):
        path = tmp_path / f"img{suffix}"
        write_image(image, path)
        back = read_image(path)
        assert back.GetSize() == image.GetSize()
        assert np.allclose(back.GetDirection(), image.GetDirection())
        assert np.allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-4)
        assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.mha", "img.nii.gz", "img.nrrd"]  # no temp files


def test_atomic_write_keeps_the_nifti_suffix(tmp_path: Path, monkeypatch) -> None:
    seen = []
    original = sitk.WriteImage

    def spy(image: sitk.Image, name: str, *args, **kwargs) -> None:
        seen.append(name)
        original(image, name, *args, **kwargs)

    monkeypatch.setattr(sitk, "WriteImage", spy)
    write_image(make_volume()[1], tmp_path / "label.nii.gz")
    assert seen[0].endswith(".nii.gz") and seen[0] != str(tmp_path / "label.nii.gz")
    with gzip.open(tmp_path / "label.nii.gz") as handle:  # really gzip-compressed NIfTI
        assert handle.read(348)[344:348] in (b"n+1\0", b"ni1\0")


def test_dicom_series_folder(tmp_path: Path) -> None:
    image, _ = make_volume(shape_zyx=(5, 8, 9), spacing=(0.8, 0.8, 2.5))
    write_dicom_series(image, tmp_path / "series")
    volume = read_image(tmp_path / "series")
    assert volume.GetSize() == image.GetSize()
    assert np.allclose(volume.GetSpacing(), image.GetSpacing(), atol=1e-3)
    assert np.array_equal(sitk.GetArrayFromImage(volume), sitk.GetArrayFromImage(image))
    with pytest.raises(DataError, match="no DICOM series"):
        read_image(tmp_path)


def test_four_d_needs_a_channel(tmp_path: Path) -> None:
    volumes = [make_volume(seed=s)[0] for s in range(3)]
    path = tmp_path / "cine.nii.gz"
    sitk.WriteImage(sitk.JoinSeries(volumes), str(path))
    with pytest.raises(DataError, match=r"cine\.nii\.gz.*4-D with 3 volumes"):
        read_image(path)
    frame = read_image(path, channel=2)
    assert np.array_equal(sitk.GetArrayFromImage(frame), sitk.GetArrayFromImage(volumes[2]))
    with pytest.raises(DataError, match=r"volume 3 asked for but the 4-D image has 3 volumes \(valid 0\.\.2\)"):
        read_image(path, channel=3)
    vector = sitk.Compose([volumes[0], volumes[1]])
    sitk.WriteImage(vector, str(tmp_path / "vector.mha"))
    with pytest.raises(DataError, match=r"channel 2 asked for but the image has 2 components \(valid 0\.\.1\)"):
        read_image(tmp_path / "vector.mha", channel=2)


@pytest.mark.parametrize("case", ["missing", "truncated", "truncated_raw", "garbage", "two_d", "nan", "inf_mha",
                                  "zero_spacing"])
def test_bad_inputs_raise_data_error_naming_the_file(tmp_path: Path, case: str) -> None:
    path = tmp_path / f"{case}.nii.gz"
    expected = {"missing": "not found", "truncated": "truncated", "truncated_raw": "truncated",
                "garbage": "cannot read", "two_d": "2-D", "nan": "NaN", "inf_mha": "NaN/Inf",
                "zero_spacing": "spacing"}[case]
    if case in ("truncated", "truncated_raw"):
        if case == "truncated_raw":
            path = tmp_path / "truncated_raw.nii"
        sitk.WriteImage(make_volume()[0], str(path))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "garbage":
        path.write_bytes(b"this is not an image at all" * 10)
    elif case == "two_d":
        sitk.WriteImage(sitk.Image(8, 8, sitk.sitkFloat32), str(path))
    elif case == "nan":
        array = np.zeros((4, 5, 6), dtype=np.float32)
        array[1, 2, 3] = np.nan
        sitk.WriteImage(sitk.GetImageFromArray(array), str(path))  # ITK alone would read the NaN as 0
    elif case == "inf_mha":
        path = tmp_path / "inf.mha"
        array = np.zeros((4, 5, 6), dtype=np.float32)
        array[0, 0, 0] = np.inf
        sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    elif case == "zero_spacing":
        path = tmp_path / "zero_spacing.nrrd"
        sitk.WriteImage(sitk.Image(4, 4, 4, sitk.sitkInt16), str(path))
        text = path.read_bytes().replace(b"space directions: (1,0,0) (0,1,0) (0,0,1)",
                                         b"space directions: (0,0,0) (0,1,0) (0,0,1)")
        path.write_bytes(text)
    with pytest.raises(DataError) as caught:
        read_image(path)
    assert str(path) in str(caught.value) and expected in str(caught.value)


def test_a_channel_asked_of_a_single_volume_is_an_error(tmp_path):
    import SimpleITK as sitk

    from duplus.data.image_io import read_image

    path = tmp_path / "flair.nii.gz"
    sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkFloat32), str(path))
    assert read_image(path, channel=0).GetSize() == (4, 4, 4)  # the only channel there is
    with pytest.raises(DataError, match="channel 2 asked for, but the image is a single 3-D volume"):
        read_image(path, channel=2)


def test_dicom_files_that_each_claim_their_own_series_are_refused(tmp_path):
    image, _ = make_volume(shape_zyx=(5, 8, 8))
    write_dicom_series(image, tmp_path / "dicom", uid_per_file=True)
    with pytest.raises(DataError, match="each form a series of one slice"):
        read_image(tmp_path / "dicom")


def test_dicom_series_that_are_not_one_even_stack_are_refused(tmp_path: Path) -> None:
    image, _ = make_volume(shape_zyx=(6, 8, 9), spacing=(0.8, 0.8, 2.0))
    echoes = tmp_path / "echoes"  # two echoes under one series UID: every position twice
    write_dicom_series(image, echoes, prefix="E1")
    write_dicom_series(image, echoes, prefix="E2")
    with pytest.raises(DataError, match=r"echoes: 6 of its 12 DICOM slices repeat a slice position"):
        read_image(echoes)
    gap = tmp_path / "gap"
    files = write_dicom_series(image, gap)
    files[3].unlink()  # a missing slice
    with pytest.raises(DataError, match=r"gap: DICOM slice spacing is uneven \(2 to 4 mm\)"):
        read_image(gap)
    with pytest.raises(DataError, match=r"one file of a 5-slice DICOM series; give its folder"):
        read_image(files[0])


def test_a_gantry_tilted_dicom_series_is_refused_an_oblique_one_is_read(tmp_path: Path) -> None:
    """ITK stacked a 15-degree gantry tilt as an upright volume with 5.18 mm slices: the in-plane drift
    of the slice origins (5 mm x tan 15 = 1.34 mm per slice) was lost and the stack stretched."""
    tilt = np.deg2rad(15.0)
    image, _ = make_volume(shape_zyx=(8, 8, 9), spacing=(0.8, 0.8, 5.0))
    # A third column leaning towards y puts slice k's origin at (0, 5 k sin, 5 k cos): a tilted gantry.
    image.SetDirection((1, 0, 0, 0, 1, float(np.sin(tilt)), 0, 0, float(np.cos(tilt))))
    write_dicom_series(image, tmp_path / "tilted", modality="CT")
    with pytest.raises(DataError, match=r"tilted: DICOM slice origins drift 9.06 mm sideways .*tilt of about 15"):
        read_image(tmp_path / "tilted")
    angle = np.deg2rad(20.0)
    oblique, _ = make_volume(shape_zyx=(8, 8, 9), spacing=(0.8, 0.8, 5.0), direction=(
        float(np.cos(angle)), 0, float(np.sin(angle)), 0, 1, 0, -float(np.sin(angle)), 0, float(np.cos(angle))))
    write_dicom_series(oblique, tmp_path / "oblique", modality="MR")
    read = read_image(tmp_path / "oblique")
    assert np.allclose(read.GetSpacing(), (0.8, 0.8, 5.0), atol=1e-4)
    assert np.allclose(read.GetDirection(), oblique.GetDirection(), atol=1e-4)


def test_a_folder_with_two_volumes_is_refused_and_scouts_are_ignored(tmp_path: Path) -> None:
    image, _ = make_volume(shape_zyx=(6, 8, 9), spacing=(0.8, 0.8, 2.0))
    study = tmp_path / "study"
    write_dicom_series(image, study, prefix="CT", series=1, modality="CT")
    scout, _ = make_volume(shape_zyx=(1, 8, 9), spacing=(0.8, 0.8, 2.0), seed=3)
    write_dicom_series(scout, study, prefix="SCOUT", series=2, modality="CT")
    assert read_image(study).GetSize() == image.GetSize()  # the scout is left out
    write_dicom_series(image, study, prefix="PT", series=3, modality="PT")
    with pytest.raises(DataError, match=r"holds 2 DICOM volumes \(CT .*6 slices.*; PT .*6 slices"):
        read_image(study)


def test_a_three_plane_localizer_beside_the_volume_is_not_a_second_volume(tmp_path: Path) -> None:
    image, _ = make_volume(shape_zyx=(6, 8, 9), spacing=(0.8, 0.8, 2.0))
    study = tmp_path / "study"
    write_dicom_series(image, study, prefix="VOL", series=1)
    planes = ((1, 0, 0, 0, 1, 0, 0, 0, 1), (1, 0, 0, 0, 0, 1, 0, -1, 0), (0, 0, 1, 1, 0, 0, 0, 1, 0))
    for k, direction in enumerate(planes):  # one image per plane, one series UID
        plane, _ = make_volume(shape_zyx=(1, 8, 9), spacing=(0.8, 0.8, 2.0), seed=k, direction=direction)
        write_dicom_series(plane, study, prefix=f"LOC{k}", series=9)
    assert read_image(study).GetSize() == image.GetSize()


@pytest.mark.parametrize("header", ["scan.mhd", "scan.nhdr"])
def test_a_detached_header_is_read_and_hashed_with_its_data_file(tmp_path: Path, header: str) -> None:
    image, _ = make_volume()
    changed = sitk.GetArrayFromImage(image)
    changed[0, 0, 0] += 1  # another scan: same geometry, one voxel differs
    other = sitk.GetImageFromArray(changed)
    other.CopyInformation(image)
    hashes = []
    for folder, volume in (("a", image), ("b", other)):
        (tmp_path / folder).mkdir()
        sitk.WriteImage(volume, str(tmp_path / folder / header))
        _, files = read_image_files(tmp_path / folder / header)
        data = [p for p in (tmp_path / folder).iterdir() if p.name != header]
        assert files == [tmp_path / folder / header, *data] and len(data) == 1
        hashes.append(sha256_files(files))
    assert (tmp_path / "a" / header).read_bytes() == (tmp_path / "b" / header).read_bytes()
    assert hashes[0] != hashes[1]


def test_header_data_file_lists_and_patterns(tmp_path: Path) -> None:
    for name in ("s001.raw", "s002.raw", "s003.raw"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "list.nhdr").write_text("NRRD0004\ntype: uint8\ndimension: 3\nsizes: 1 1 3\nencoding: raw\n"
                                        "data file: LIST 2\ns002.raw\ns001.raw\n")
    assert image_files(tmp_path / "list.nhdr") == [tmp_path / n for n in ("list.nhdr", "s002.raw", "s001.raw")]
    (tmp_path / "range.nhdr").write_text("NRRD0004\ntype: uint8\ndimension: 3\nsizes: 1 1 3\nencoding: raw\n"
                                         "data file: s%03d.raw 1 3 1 2\n\n")
    assert image_files(tmp_path / "range.nhdr") == [tmp_path / n for n in ("range.nhdr", "s001.raw", "s002.raw",
                                                                          "s003.raw")]
    (tmp_path / "list.mhd").write_text("NDims = 3\nDimSize = 1 1 2\nElementType = MET_UCHAR\n"
                                       "ElementDataFile = LIST 2D\ns003.raw\ns001.raw\n")
    assert image_files(tmp_path / "list.mhd") == [tmp_path / n for n in ("list.mhd", "s003.raw", "s001.raw")]
    (tmp_path / "gone.mhd").write_text("NDims = 3\nElementDataFile = gone.raw\n")
    with pytest.raises(DataError, match=r"gone\.mhd: ElementDataFile names .*gone\.raw, which is not there"):
        image_files(tmp_path / "gone.mhd")
    assert image_files(tmp_path / "s001.raw") == [tmp_path / "s001.raw"]


def test_a_dicom_series_is_hashed_by_all_its_slices(tmp_path: Path) -> None:
    image, _ = make_volume(shape_zyx=(5, 8, 9), spacing=(0.8, 0.8, 2.5))
    written = write_dicom_series(image, tmp_path / "series")
    _, files = read_image_files(tmp_path / "series")
    assert files == sorted(written)
    before = sha256_files(files)
    written[2].write_bytes(written[2].read_bytes()[:-2] + b"\x01\x00")  # one voxel of one slice changed
    assert sha256_files(read_image_files(tmp_path / "series")[1]) != before
