"""Prognosis from several scans of the same patients: HECKTOR's CT and PET, each a block of features.

Run on the generated HECKTOR 2022 miniature (tests/hecktor_fixture.py: CT ~1 mm and PET 4 mm on
different grids and origins, the label drawn on the CT grid), downloaded and preprocessed as the
pipeline does it, with the stand-in model of fakes.py.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
from hecktor_fixture import write_hecktor

from duplus.data.download import run_download
from duplus.data.preprocess import run_preprocess
from duplus.prognosis.features import FeatureSettings, case_features
from duplus.prognosis.prognosis_stage import run_prognosis

from .conftest import HEADNECK
from .fakes import FakePromptCache
from .test_run import fakes  # noqa: F401 - the fixture: fake model, prompt wording and sentence encoder

SCANS = ("hecktor2022_ct", "hecktor2022_pet")
PATIENTS = tuple(f"{center}-{i:03d}" for center in ("CHUM", "CHUP") for i in range(1, 4))
SPACING = 2.0


@pytest.fixture(scope="module")
def hecktor(tmp_path_factory) -> dict:
    """The miniature placed once under raw/hecktor2022/ with a clinical table, both datasets preprocessed."""
    root = tmp_path_factory.mktemp("hecktor")
    release = write_hecktor(root / "raw" / "hecktor2022", cases=PATIENTS)
    config = {"seed": 0, "paths": {"raw": str(root / "raw")}, "preprocess": {"spacing": [SPACING] * 3}}
    manifests = {}
    for name in SCANS:
        record = root / "raw" / name / "download.json"
        run_download(name, config, record)
        manifests[name] = root / "pre" / name / "manifest.csv"
        run_preprocess(name, config, record, manifests[name])
    rng = np.random.default_rng(1)
    pd.DataFrame([{"patient_id": case, "rfs_months": float(rng.exponential(30)), "relapse": i % 2, "age": 50 + i,
                   "weight": 70 + i, "center": case.split("-")[0], "tobacco": ["never", "current"][i % 2],
                   "alcohol": i % 2, "performance_status": i % 3, "gender": "M" if i % 3 else "F",
                   "hpv": (i + 1) % 2, "surgery": 0, "chemotherapy": 1}
                  for i, case in enumerate(PATIENTS)]).to_csv(release / "clinical.csv", index=False)
    return {"root": root, "release": release, "manifests": manifests, "config": config}


def prognosis_config(hecktor: dict, datasets) -> dict:
    return {**hecktor["config"], "device": "cpu", "pretrain": {"patch_size": [8, 8, 8]},
            "inference": {"threshold": 0.5}, "prompts": {"source": "fake", "pooling": "mean"},
            "prognosis": {**HEADNECK["prognosis"], "enabled": True, "dataset": datasets, "folds": 3,
                          "merge": ["tabular"], "tumour_mask": "label", "epochs": 5, "lr": 0.01, "hidden": 4,
                          "time_bins": 3, "evaluation": {"bootstrap": 5}}}


def drawn_tumour_ml(release: Path, case: str) -> float:
    """Primary tumour and nodes of the label as drawn, on its own (CT) grid."""
    label = sitk.ReadImage(str(release / "labelsTr" / f"{case}.nii.gz"))
    return np.count_nonzero(sitk.GetArrayViewFromImage(label)) * float(np.prod(label.GetSpacing())) / 1000.0


def test_each_patient_gets_a_named_block_per_scan(hecktor, fakes, tmp_path):  # noqa: F811
    images = {name: np.load(hecktor["manifests"][name].parent / "CHUM-002" / "image.npy") for name in SCANS}
    assert images["hecktor2022_ct"].shape != images["hecktor2022_pet"].shape   # other grids, other fields of view
    out = tmp_path / "prognosis"
    run_prognosis(prognosis_config(hecktor, list(SCANS)), list(hecktor["manifests"].values()), FakePromptCache(),
                  None, out, model=fakes[1], model_key="base")

    cohort = json.loads((out / "cohort.json").read_text(encoding="utf-8"))
    width = 2 * 3 + 1                                      # the fake's 3 bottleneck channels: GAP, tumour, volume
    assert cohort["datasets"] == list(SCANS) and cohort["patients"] == len(PATIENTS)
    assert cohort["image_blocks"] == [
        {"dataset": "hecktor2022_ct", "modality": "CT", "first_column": 0, "columns": width},
        {"dataset": "hecktor2022_pet", "modality": "PET", "first_column": width, "columns": width}]
    assert cohort["feature_dim"] == 2 * width and cohort["incomplete_patients"] == {} and cohort["warnings"] == []

    table = pd.read_csv(out / "image_features.csv", dtype={"patient_id": str}).set_index("patient_id")
    assert sorted(table.index) == sorted(PATIENTS)
    assert list(table.columns[:2]) == ["hecktor2022_ct/gap_0", "hecktor2022_ct/gap_1"]
    assert list(table.columns[width:width + 1]) == ["hecktor2022_pet/gap_0"]
    for case in PATIENTS:
        for name in SCANS:
            block = table.loc[case, [c for c in table.columns if c.startswith(f"{name}/")]].to_numpy(float)
            # Each block is that scan's own feature vector, cached apart from the other scan's (one case id).
            cached = np.load(out / "features" / name / f"{case}.npy")
            np.testing.assert_allclose(block, cached, rtol=1e-6)
            # The tumour volume of each block, from the label resampled straight onto that scan's grid,
            # is the volume drawn on the CT grid (nearest neighbour at 2 mm: within 10 %; 6.5 % at most here).
            assert math.expm1(table.loc[case, f"{name}/log_tumour_ml"]) == pytest.approx(
                drawn_tumour_ml(hecktor["release"], case), rel=0.1), (case, name)
        ct, pet = (table.loc[case, f"{name}/gap_0"] for name in SCANS)
        assert ct != pytest.approx(pet)                     # the CT's intensities are not the PET's
    # Recomputed from each scan's stored array, outside the stage: the blocks are in the listed order.
    for name, modality in zip(SCANS, ("CT", "PET")):
        folder = hecktor["manifests"][name].parent / "CHUM-002"
        vector, _ = case_features(fakes[1], np.load(folder / "image.npy"), modality, torch.zeros(8), torch.zeros(2, 8),
                                  FeatureSettings(mask_source="label", voxel_ml=SPACING ** 3 / 1000,
                                                  patch_size=(8, 8, 8)), label=np.load(folder / "label.npy"))
        np.testing.assert_allclose(table.loc["CHUM-002", [c for c in table.columns if c.startswith(f"{name}/")]]
                                   .to_numpy(float), vector, rtol=1e-5)


def test_a_patient_without_one_of_the_scans_is_left_out_and_named(hecktor, fakes, tmp_path):  # noqa: F811
    manifests = {}
    for name, manifest in hecktor["manifests"].items():
        # A copy of each store, the CT's without CHUP-003 (as a cohort of one's own may lack a scan).
        store = tmp_path / name
        shutil.copytree(manifest.parent, store)
        frame = pd.read_csv(store / "manifest.csv", dtype=str)
        if name == "hecktor2022_ct":
            frame = frame[frame["case"] != "CHUP-003"]
        frame.to_csv(store / "manifest.csv", index=False)
        manifests[name] = store / "manifest.csv"
    out = tmp_path / "prognosis"
    run_prognosis(prognosis_config(hecktor, list(SCANS)), list(manifests.values()), FakePromptCache(), None, out,
                  model=fakes[1], model_key="base")
    cohort = json.loads((out / "cohort.json").read_text(encoding="utf-8"))
    assert cohort["patients"] == len(PATIENTS) - 1 and cohort["incomplete_patients"] == {"hecktor2022_ct": ["CHUP-003"]}
    assert any("1 patient(s) of the EHR table left out" in w and "no hecktor2022_ct case for 1: CHUP-003" in w
               for w in cohort["warnings"])
    risks = pd.read_csv(out / "risks.csv", dtype={"patient_id": str})
    assert "CHUP-003" not in set(risks["patient_id"]) and len(set(risks["patient_id"])) == len(PATIENTS) - 1


def test_one_name_is_one_block_as_before(hecktor, fakes, tmp_path):  # noqa: F811
    out = tmp_path / "prognosis"
    run_prognosis(prognosis_config(hecktor, "hecktor2022_pet"), [hecktor["manifests"]["hecktor2022_pet"]],
                  FakePromptCache(), None, out, model=fakes[1], model_key="base")
    cohort = json.loads((out / "cohort.json").read_text(encoding="utf-8"))
    assert cohort["datasets"] == ["hecktor2022_pet"] and [b["dataset"] for b in cohort["image_blocks"]] == [
        "hecktor2022_pet"]
    assert pd.read_csv(out / "image_features.csv").shape[1] == 1 + 7
