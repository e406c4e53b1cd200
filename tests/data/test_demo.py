"""Demo phantoms: deterministic bytes, the contract's labels and layout, scanner differences that survive z-scoring."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from data_helpers import TINY

from duplus.data.geometry import orientation_code
from duplus.demo.generate import generate_demo
from duplus.hashing import sha256_tree

EHR = ["patient_id", "rfs_months", "relapse", "age", "weight", "center", "tobacco", "alcohol", "performance_status",
       "gender", "hpv", "surgery", "chemotherapy"]


def _read(root: Path, folder: str, case: str) -> sitk.Image:
    return sitk.ReadImage(str(root / folder / f"{case}.nii.gz"))


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path: Path) -> None:
    config = {"seed": 3, "demo": {"cases_per_center": 1, "headneck_patients": 4}}
    generate_demo("demo_headneck_pet", config, tmp_path / "a")
    generate_demo("demo_headneck_pet", config, tmp_path / "b")
    generate_demo("demo_headneck_pet", {**config, "seed": 4}, tmp_path / "c")
    assert sha256_tree(tmp_path / "a") == sha256_tree(tmp_path / "b")
    assert (tmp_path / "a" / "imagesTr" / "hnpet_siteA_000.nii.gz").read_bytes() != \
        (tmp_path / "c" / "imagesTr" / "hnpet_siteA_000.nii.gz").read_bytes()


def test_msd_layout_with_centers_and_labels(demo_raw: Path) -> None:
    root = demo_raw / "demo_abdomen_ct"
    index = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    assert index["labels"] == {"0": "background", "1": "liver", "2": "right kidney", "3": "left kidney",
                               "4": "spleen", "5": "liver tumor"}
    assert len(index["training"]) == 2 * TINY["demo"]["cases_per_center"]
    assert {entry["center"] for entry in index["training"]} == {"siteA", "siteB"}
    for entry in index["training"]:
        image, label = sitk.ReadImage(str(root / entry["image"])), sitk.ReadImage(str(root / entry["label"]))
        assert image.GetSize() == label.GetSize() and image.GetOrigin() == label.GetOrigin()
        values = set(np.unique(sitk.GetArrayFromImage(label)).tolist())
        assert values == {0, 1, 2, 3, 4, 5}
        assert 60 <= image.GetSize()[0] <= 130 and 30 <= image.GetSize()[2] <= 60
    mri = json.loads((demo_raw / "demo_abdomen_mri" / "dataset.json").read_text(encoding="utf-8"))
    assert "5" not in mri["labels"] and mri["sequence"] == "T2"


def test_tumour_lies_inside_the_liver(demo_raw: Path) -> None:
    from scipy import ndimage

    label = sitk.GetArrayFromImage(_read(demo_raw / "demo_abdomen_ct", "labelsTr", "abdct_siteA_000"))
    tumour = label == 5
    assert tumour.any()
    # Every tumour voxel is surrounded by liver or tumour, never by kidney, spleen or background.
    ring = ndimage.binary_dilation(tumour) & ~tumour
    assert set(np.unique(label[ring]).tolist()) <= {1, 5}


def test_centers_differ_in_spacing_orientation_and_noise(demo_raw: Path) -> None:
    root = demo_raw / "demo_abdomen_ct"
    a, b = _read(root, "imagesTr", "abdct_siteA_000"), _read(root, "imagesTr", "abdct_siteB_000")
    assert orientation_code(a) != orientation_code(b)
    assert a.GetSpacing() != b.GetSpacing() and len(set(b.GetSpacing())) > 1  # siteB is anisotropic

    def air_noise(image: sitk.Image) -> float:
        array = sitk.GetArrayFromImage(image).astype(float)
        return float(array[:, :3, :3].std())

    assert air_noise(b) > 1.8 * air_noise(a)


def _zscored_contrast(root: Path, case: str, first: int, second: int) -> float:
    image = sitk.GetArrayFromImage(_read(root, "imagesTr", case)).astype(float)
    label = sitk.GetArrayFromImage(_read(root, "labelsTr", case))
    body = image > (-500 if "abdct" in case else np.percentile(image, 99) * 0.05)
    z = (image - image[body].mean()) / image[body].std()
    return float(z[label == first].mean() - z[label == second].mean())


@pytest.mark.parametrize("dataset, prefix", [("demo_abdomen_ct", "abdct"), ("demo_abdomen_mri", "abdmr")])
def test_liver_spleen_contrast_differs_between_sites_after_zscoring(demo_raw: Path, dataset: str, prefix: str
                                                                    ) -> None:
    root = demo_raw / dataset
    site_a = [_zscored_contrast(root, f"{prefix}_siteA_{i:03d}", 1, 4) for i in range(2)]
    site_b = [_zscored_contrast(root, f"{prefix}_siteB_{i:03d}", 1, 4) for i in range(2)]
    # Per-image z-scoring cannot align the scanners: liver-minus-spleen differs clearly between sites.
    assert min(abs(x - y) for x in site_a for y in site_b) > 0.3


def test_ct_tumour_is_hypodense_at_site_a_and_hyperdense_at_site_b(demo_raw: Path) -> None:
    root = demo_raw / "demo_abdomen_ct"
    assert _zscored_contrast(root, "abdct_siteA_000", 5, 1) < 0 < _zscored_contrast(root, "abdct_siteB_000", 5, 1)


def test_clinical_table_has_the_configured_columns_and_censoring(tmp_path: Path) -> None:
    config = {"seed": 1, "demo": {"cases_per_center": 1, "headneck_patients": 40}}
    generate_demo("demo_headneck_pet", config, tmp_path / "hn")
    table = pd.read_csv(tmp_path / "hn" / "clinical.csv")
    assert list(table.columns) == EHR
    assert len(table) == 40 and table["patient_id"].is_unique
    assert (table["center"].value_counts() == 20).all()
    ids = sorted(p.name[:-7] for p in (tmp_path / "hn" / "imagesTr").glob("*.nii.gz"))
    assert sorted(table["patient_id"]) == ids
    assert 0.4 <= 1 - table["relapse"].mean() <= 0.6
    assert (table["rfs_months"] > 0).all() and table["relapse"].isin([0, 1]).all()
    assert table[["patient_id", "rfs_months", "relapse", "center"]].notna().all().all()
    assert 1 <= table[["hpv", "tobacco", "alcohol", "weight", "performance_status"]].isna().sum().sum() <= 20


def test_hazard_depends_on_tumour_burden_and_ehr() -> None:
    from duplus.demo.cohort import draw_outcomes, draw_patient

    rng = np.random.default_rng(0)
    patients = [draw_patient(f"p{i}", "siteA", rng) for i in range(600)]
    log_volume = np.log(np.array([p.primary_ml + sum(p.node_ml) for p in patients]))
    time, event = draw_outcomes(patients, log_volume, np.random.default_rng(1))
    big = log_volume > np.median(log_volume)
    hpv = np.array([p.hpv for p in patients]) == 1
    # Crude event rate per month of follow-up: larger tumours and HPV-negative disease fail sooner.
    rate = lambda m: event[m].sum() / time[m].sum()  # noqa: E731
    assert rate(big) > 1.5 * rate(~big)
    assert rate(~hpv) > 1.5 * rate(hpv)
