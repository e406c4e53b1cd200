"""HECKTOR 2022 as PET/CT pairs, on a generated miniature of its training release (tests/hecktor_fixture.py).

CT (~1 mm) and PET (4 mm) lie on different grids with different origins, the label on the CT grid.
Each step is checked: one placement read by a CT and a PET dataset, the same patients on the same
side of the split, the label resampled from its own grid straight onto each training grid.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hecktor_fixture import CASES, write_hecktor

from duplus.data import geometry as geo
from duplus.data.download import run_download
from duplus.data.integrity import check_cases
from duplus.data.intensity import apply_box
from duplus.data.layouts import list_cases, read_case
from duplus.data.preprocess import assign_splits, process_case, settings
from duplus.data.registry import get_dataset
from duplus.errors import DownloadError

HECKTOR = ("hecktor2022_ct", "hecktor2022_pet")


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    return write_hecktor(tmp_path_factory.mktemp("raw") / "hecktor2022")


def test_the_ct_and_the_pet_dataset_list_the_same_patients_each_with_its_own_scan(release):
    listed = {name: list_cases(get_dataset(name), release) for name in HECKTOR}
    assert {name: get_dataset(name).modality for name in HECKTOR} == {"hecktor2022_ct": "CT", "hecktor2022_pet": "PET"}
    for name, suffix in zip(HECKTOR, ("__CT.nii.gz", "__PT.nii.gz")):
        cases = listed[name]
        assert [(c.case_id, c.center) for c in cases] == [(i, i.split("-")[0]) for i in CASES]
        assert all(c.image == release / "imagesTr" / f"{c.case_id}{suffix}" for c in cases)
        assert all(c.label == release / "labelsTr" / f"{c.case_id}.nii.gz" for c in cases)
        check_cases(name, cases)
    # The split is drawn from case ids and centers: both scans of a patient fall on the same side.
    splits = {}
    for name, cases in listed.items():
        stubs = [{"case": c.case_id, "center": c.center, "subject": c.subject} for c in cases]
        assign_splits(stubs, seed=3, test_fraction=0.5)
        splits[name] = [s["split"] for s in stubs]
    assert splits["hecktor2022_ct"] == splits["hecktor2022_pet"] and "test" in splits["hecktor2022_ct"]


def test_a_missing_scan_is_named_by_the_integrity_check(release, tmp_path):
    partial = write_hecktor(tmp_path / "partial", cases=("MDA-103",))
    (partial / "imagesTr" / "MDA-103__CT.nii.gz").unlink()
    cases = list_cases(get_dataset("hecktor2022_ct"), partial)
    assert [c.case_id for c in cases] == ["MDA-103"]  # listed from its label, so the PET dataset's twin
    with pytest.raises(Exception, match=r"case MDA-103: image .*MDA-103__CT.nii.gz not found"):
        check_cases("hecktor2022_ct", cases)


def test_the_label_comes_on_its_own_grid(release):
    for name in HECKTOR:
        image, label = read_case(list_cases(get_dataset(name), release)[0])
        drawn = sitk.ReadImage(str(release / "labelsTr" / "CHUM-001.nii.gz"))
        assert label.GetSize() == drawn.GetSize() and label.GetOrigin() == drawn.GetOrigin()
        assert (image.GetSize() == drawn.GetSize()) == (name == "hecktor2022_ct")


@pytest.mark.parametrize("name", HECKTOR)
def test_the_label_is_resampled_from_its_own_grid_straight_onto_the_training_grid(release, tmp_path, name):
    spec = get_dataset(name)
    options = settings({"preprocess": {"spacing": [1.5, 1.5, 1.5]}})
    drawn = sitk.ReadImage(str(release / "labelsTr" / "CHUM-002.nii.gz"))
    case = next(c for c in list_cases(spec, release) if c.case_id == "CHUM-002")
    row = process_case(case, spec, options, 0, str(tmp_path), str(tmp_path))
    meta = json.loads((tmp_path / row["meta"]).read_text())
    stored = np.load(tmp_path / row["label"])
    # Nearest neighbour from the drawn label itself onto the training grid, cropped as stored. (A copy by
    # way of the 4 mm PET grid overlaps it with a Dice of only 0.76 for this case's node, 0.85 for its tumour.)
    direct = sitk.GetArrayFromImage(geo.resample(drawn, meta["resampled"], "nearest", 0, sitk.sitkUInt8))
    assert np.array_equal(stored, apply_box(direct, meta["crop_box"]))
    # The small node keeps its volume to what a 1.5 mm grid can hold.
    voxel_ml = {"drawn": np.prod(drawn.GetSpacing()) / 1000, "stored": 1.5 ** 3 / 1000}
    node = {"drawn": np.count_nonzero(sitk.GetArrayViewFromImage(drawn) == 2) * voxel_ml["drawn"],
            "stored": np.count_nonzero(stored == 2) * voxel_ml["stored"]}
    assert node["stored"] == pytest.approx(node["drawn"], rel=0.08)
    assert row["modality"] == spec.modality and meta["modality"] == spec.modality
    assert row["raw_label"] == str((release / "labelsTr" / "CHUM-002.nii.gz").resolve())  # scored as drawn


def test_one_placement_serves_both_datasets(release, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "hecktor2022").symlink_to(release, target_is_directory=True)
    records = {name: run_download(name, {}, raw / name / "download.json") for name in HECKTOR}
    assert {r["root"] for r in records.values()} == {str(release.resolve())}
    assert records["hecktor2022_ct"]["files"] == records["hecktor2022_pet"]["files"]
    assert len(records["hecktor2022_ct"]["files"]) == 3 * len(CASES)
    with pytest.raises(DownloadError, match=r"(?s)dataset hecktor2022_pet must be placed by hand.*"
                                            r"Dataset folder: .*empty/hecktor2022"):
        run_download("hecktor2022_pet", {}, tmp_path / "empty" / "hecktor2022_pet" / "download.json")
