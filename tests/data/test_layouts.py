"""Raw layouts of the paper's datasets, on miniature replicas: CHAOS DICOM + PNG, M&Ms 4-D cine, AMOS, HECKTOR."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from data_helpers import make_volume, write_dicom_series

from duplus.data.integrity import check_cases
from duplus.data.layouts import list_cases, read_case
from duplus.data.preprocess import process_case, settings
from duplus.data.registry import get_dataset
from duplus.errors import DataError


def test_chaos_pngs_follow_the_dicom_slice_order(tmp_path: Path) -> None:
    image, label = make_volume(shape_zyx=(6, 10, 12), spacing=(1.5, 1.5, 5.0))
    reversed_direction = (1, 0, 0, 0, 1, 0, 0, 0, -1)  # file order opposite to the reader's slice order
    image.SetDirection(reversed_direction)
    label.SetDirection(reversed_direction)
    patient = tmp_path / "Train_Sets" / "MR" / "3" / "T2SPIR"
    files = write_dicom_series(image, patient / "DICOM_anon")
    grey = {0: 0, 1: 63, 2: 241}  # 241: a spleen edge pixel, inside the challenge's 240-255 band
    array = sitk.GetArrayFromImage(label)
    (patient / "Ground").mkdir()
    for k, dicom in enumerate(files):
        png = np.vectorize(grey.get)(array[k]).astype(np.uint8)
        sitk.WriteImage(sitk.GetImageFromArray(png), str(patient / "Ground" / f"{dicom.stem}.png"))
    spec = get_dataset("chaos_t2")
    cases = list_cases(spec, tmp_path / "Train_Sets")
    assert [c.case_id for c in cases] == ["chaos_3"]
    read_image_, read_label = read_case(cases[0])
    assert read_label is not None
    # Grey values become ids (63 liver -> 1, 241 spleen -> 4); each label slice sits on the image slice
    # that came from the DICOM file of the same name, whatever order the series reader chose.
    mapped = np.select([array == 1, array == 2], [1, 4], 0)
    source, loaded = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(read_image_)
    order = [next(k for k in range(len(files)) if np.array_equal(loaded[j], source[k])) for j in range(len(files))]
    assert order == list(range(len(files)))[::-1]  # the reader did reorder the files
    assert np.array_equal(sitk.GetArrayFromImage(read_label), mapped[order])
    check_cases("chaos_t2", cases)


def test_mnms_gives_one_case_per_phase_from_4d_files(tmp_path: Path) -> None:
    frames = [make_volume(seed=s) for s in range(4)]
    subject = tmp_path / "OpenDataset" / "Training" / "Labeled" / "A1B2C3"
    subject.mkdir(parents=True)
    sitk.WriteImage(sitk.JoinSeries([f[0] for f in frames]), str(subject / "A1B2C3_sa.nii.gz"))
    sitk.WriteImage(sitk.JoinSeries([f[1] for f in frames]), str(subject / "A1B2C3_sa_gt.nii.gz"))
    (tmp_path / "OpenDataset" / "info.csv").write_text("External code,VendorName,Vendor,Centre,ED,ES\n"
                                                      "A1B2C3,Siemens,A,1,0,2\n")
    spec = get_dataset("mnms")
    cases = list_cases(spec, tmp_path)
    assert [(c.case_id, c.channel, c.center) for c in cases] == [("A1B2C3_ed", 0, "centre1"),
                                                                 ("A1B2C3_es", 2, "centre1")]
    assert {c.subject for c in cases} == {"A1B2C3"}  # both phases of one heart share a split
    image, label = read_case(cases[1])
    assert np.array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(frames[2][0]))
    # Preprocessing keeps a 3-D copy of the chosen frame for evaluation in the original space.
    row = process_case(cases[1], spec, settings({}), 0, str(tmp_path / "stage"), str(tmp_path / "final"))
    assert row["raw_image"] == str((tmp_path / "final" / "A1B2C3_es" / "image_original.nii.gz").resolve())
    copy = sitk.ReadImage(str(tmp_path / "stage" / "A1B2C3_es" / "image_original.nii.gz"))
    assert copy.GetDimension() == 3


def test_amos_splits_ct_and_mri_by_case_number(tmp_path: Path) -> None:
    root = tmp_path / "amos22"
    for folder in ("imagesTr", "labelsTr", "imagesVa", "labelsVa"):
        (root / folder).mkdir(parents=True)
    for name, folder in (("amos_0001", "Tr"), ("amos_0507", "Tr"), ("amos_0008", "Va")):
        for kind in ("images", "labels"):
            (root / f"{kind}{folder}" / f"{name}.nii.gz").write_bytes(b"x")
    assert [c.case_id for c in list_cases(get_dataset("amos_ct"), root)] == ["amos_0001", "amos_0008"]
    assert [c.case_id for c in list_cases(get_dataset("amos_mr"), root)] == ["amos_0507"]


def test_hecktor_label_on_the_ct_grid_is_read_on_its_own_grid(tmp_path: Path) -> None:
    pet, _ = make_volume(shape_zyx=(10, 12, 12), spacing=(4.0, 4.0, 4.0))
    _, label = make_volume(shape_zyx=(20, 24, 24), spacing=(2.0, 2.0, 2.0))
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    sitk.WriteImage(sitk.Cast(pet, sitk.sitkFloat32), str(tmp_path / "imagesTr" / "CHUM-001__PT.nii.gz"))
    sitk.WriteImage(label, str(tmp_path / "labelsTr" / "CHUM-001.nii.gz"))
    spec = get_dataset("hecktor2022_pet")
    cases = list_cases(spec, tmp_path)
    assert [(c.case_id, c.center) for c in cases] == [("CHUM-001", "CHUM")]
    image, drawn = read_case(cases[0])  # resampled later, from its own grid onto the training grid
    assert drawn is not None and drawn.GetSize() == label.GetSize() != image.GetSize()
    check_cases("hecktor2022_pet", cases)
    broken = sitk.Cast(label, sitk.sitkFloat32) * 1.5  # 1.5, 3.0: not label ids
    broken.CopyInformation(label)
    sitk.WriteImage(broken, str(tmp_path / "labelsTr" / "CHUM-001.nii.gz"))
    with pytest.raises(DataError, match="CHUM-001.nii.gz: label of case CHUM-001 holds values .* 1.5"):
        read_case(cases[0])


def test_empty_or_missing_folders_are_reported(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        list_cases(get_dataset("kits19"), tmp_path / "nowhere")
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match="no cases found"):
        list_cases(get_dataset("kits19"), tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [{"image": "./imagesTr/a.nii.gz"}]}))
    with pytest.raises(DataError, match=r"training\[0\] needs 'image' and 'label'"):
        list_cases(get_dataset("msd_spleen"), tmp_path)


def test_kits19_cases_without_a_segmentation_are_not_training_cases(tmp_path: Path) -> None:
    image, label = make_volume()
    for case, labelled in (("case_00000", True), ("case_00210", False)):
        folder = tmp_path / "data" / case
        folder.mkdir(parents=True)
        sitk.WriteImage(image, str(folder / "imaging.nii.gz"))
        if labelled:
            sitk.WriteImage(label, str(folder / "segmentation.nii.gz"))
    assert [c.case_id for c in list_cases(get_dataset("kits19"), tmp_path)] == ["case_00000"]


def test_nnunet_channel_files_make_one_case_and_an_id_ending_in_digits_keeps_them(tmp_path: Path) -> None:
    image, label = make_volume()
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    for name in ("a_0000", "a_0001", "scan_2024"):  # two channels of case a; a case whose id ends in digits
        sitk.WriteImage(image, str(tmp_path / "imagesTr" / f"{name}.nii.gz"))
    for name in ("a", "scan_2024"):
        sitk.WriteImage(label, str(tmp_path / "labelsTr" / f"{name}.nii.gz"))
    settings = {"kind": "msd", "root": str(tmp_path), "modality": "MRI", "region": "brain", "labels": {"1": "liver"}}
    cases = list_cases(get_dataset("mine", {"datasets": {"mine": settings}}), tmp_path)
    assert [(c.case_id, Path(c.image).name, Path(c.label).name) for c in cases] == [
        ("a", "a_0000.nii.gz", "a.nii.gz"), ("scan_2024", "scan_2024.nii.gz", "scan_2024.nii.gz")]
    assert all(Path(c.label).exists() for c in cases)


def _mine(root: Path) -> dict:
    return {"datasets": {"mine": {"kind": "msd", "root": str(root), "modality": "CT", "region": "abdomen",
                                  "labels": {"1": "liver", "2": "liver tumor"}}}}


def test_dataset_json_names_cases_by_their_listed_names_and_finds_nnunet_v1_channel_files(tmp_path: Path) -> None:
    image, label = make_volume()
    store = tmp_path / "store"
    (store / "p1").mkdir(parents=True)
    (store / "p2").mkdir(parents=True)
    root = tmp_path / "ds"
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
    for case in ("p1", "p2"):  # symlinks into a store whose files are all called ct.nii.gz
        sitk.WriteImage(image, str(store / case / "ct.nii.gz"))
        (root / "imagesTr" / f"{case}.nii.gz").symlink_to(store / case / "ct.nii.gz")
        sitk.WriteImage(label, str(root / "labelsTr" / f"{case}.nii.gz"))
    sitk.WriteImage(image, str(root / "imagesTr" / "v1_0000.nii.gz"))  # nnU-Net v1: listed without _0000
    sitk.WriteImage(label, str(root / "labelsTr" / "v1.nii.gz"))
    training = [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in ("p1", "p2", "v1")]
    (root / "dataset.json").write_text(json.dumps({"training": training}))
    cases = list_cases(get_dataset("mine", _mine(root)), root)
    assert [(c.case_id, Path(c.image).name) for c in cases] == [("p1", "ct.nii.gz"), ("p2", "ct.nii.gz"),
                                                                ("v1", "v1_0000.nii.gz")]
    check_cases("mine", cases)


def test_upper_case_suffixes_are_images_too(tmp_path: Path) -> None:
    image, label = make_volume()
    for folder, volume in (("imagesTr", image), ("labelsTr", label)):
        (tmp_path / folder).mkdir()
        sitk.WriteImage(volume, str(tmp_path / folder / "case1.nii.gz"))  # ITK writes lower case only
        (tmp_path / folder / "case1.nii.gz").rename(tmp_path / folder / "CASE1.NII.GZ")
    cases = list_cases(get_dataset("mine", _mine(tmp_path)), tmp_path)
    assert [c.case_id for c in cases] == ["CASE1"]
    read_case(cases[0])  # a valid upper-case .GZ is not "truncated"


@pytest.mark.parametrize("table, message", [
    ("Code,ED,ES\nA1B2C3,0,2\n", "lacks column"),
    ("External code,Centre,ED,ES\nA1B2C3,1,,2\n", "no frame number in column 'ED'"),
])
def test_mnms_table_mistakes_name_the_csv_and_the_subject(tmp_path: Path, table: str, message: str) -> None:
    (tmp_path / "OpenDataset" / "Training" / "Labeled" / "A1B2C3").mkdir(parents=True)
    (tmp_path / "OpenDataset" / "info.csv").write_text(table)
    with pytest.raises(DataError, match=message) as caught:
        list_cases(get_dataset("mnms"), tmp_path)
    assert "info.csv" in str(caught.value)


def test_autopet_studies_of_one_patient_are_one_subject(tmp_path: Path) -> None:
    image, label = make_volume(seed=1)
    for study in ("01-2001-PET", "02-2002-PET"):
        folder = tmp_path / "FDG-PET-CT-Lesions" / "PETCT_0af7" / study
        folder.mkdir(parents=True)
        sitk.WriteImage(image, str(folder / "SUV.nii.gz"))
        sitk.WriteImage(label, str(folder / "SEG.nii.gz"))
    cases = list_cases(get_dataset("autopet"), tmp_path)
    assert [c.case_id for c in cases] == ["PETCT_0af7_01-2001-PET", "PETCT_0af7_02-2002-PET"]
    assert {c.subject for c in cases} == {"PETCT_0af7"}
