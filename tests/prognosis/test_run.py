"""The prognosis stage end to end on a tiny store, with fakes for the model, prompts and encoder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from duplus.errors import ConfigError, EHRError
from duplus.hashing import sha256_file
from duplus.prognosis import prognosis_stage as run_module
from duplus.prognosis.evaluate import AUC_COLUMNS, FOLD_COLUMNS, RISK_COLUMNS, SUMMARY_COLUMNS
from duplus.prognosis.prognosis_stage import run_prognosis

from .conftest import HEADNECK
from .fakes import FakeDuPLUS, FakePromptCache

N = 24


def make_project(root: Path) -> dict:
    rng = np.random.default_rng(0)
    store = root / "data" / "preprocessed" / "demo_headneck_pet"
    rows, clinical = [], []
    for i in range(N):
        case = f"HN{i:02d}"
        (store / case).mkdir(parents=True)
        image = np.zeros((8, 8, 8), np.float32)
        size = 1 + i % 4                                   # tumour size drives the hazard
        image[:size, :size, :size] = 1.0
        label = (image > 0).astype(np.uint8)
        np.save(store / case / "image.npy", image)
        np.save(store / case / "label.npy", label)
        center = ["CHUM", "CHUP"][i % 2]
        rows.append({"dataset": "demo_headneck_pet", "case": case, "center": center, "modality": "PET",
                     "sequence": "", "region": "head and neck", "split": "train" if i % 4 else "test",
                     "image": f"{case}/image.npy", "label": f"{case}/label.npy", "meta": f"{case}/meta.json",
                     "locations": f"{case}/locations.npz", "shape": "8x8x8",
                     "labels": json.dumps({"1": "primary tumor", "2": "lymph node"}), "raw_image": "", "raw_label": ""})
        clinical.append({"patient_id": case, "rfs_months": float(rng.exponential(40 / size)),
                         "relapse": int(i % 3 != 0), "age": 50 + i, "weight": np.nan if i == 3 else 70 + i % 7,
                         "center": center, "tobacco": ["current", "never"][i % 2], "alcohol": i % 2,
                         "performance_status": i % 3, "gender": "M" if i % 2 else "F", "hpv": i % 2,
                         "surgery": 0, "chemotherapy": 1})
    pd.DataFrame(rows).to_csv(store / "manifest.csv", index=False)
    (root / "data" / "raw" / "demo_headneck_pet").mkdir(parents=True)
    pd.DataFrame(clinical).to_csv(root / "data" / "raw" / "demo_headneck_pet" / "clinical.csv", index=False)
    config = {"seed": 0, "device": "cpu", "paths": {"raw": str(root / "data" / "raw")},
              "preprocess": {"spacing": [4.0, 4.0, 4.0]}, "pretrain": {"patch_size": [8, 8, 8]},
              "inference": {"threshold": 0.5}, "prompts": {"source": "fake", "pooling": "mean", "batch_size": 8},
              "prognosis": {**HEADNECK["prognosis"], "enabled": True, "dataset": "demo_headneck_pet", "folds": 3,
                            "merge": ["tabular", "text"], "epochs": 10, "lr": 0.01, "hidden": 8, "time_bins": 4}}
    return {"config": config, "manifest": store / "manifest.csv"}


@pytest.fixture
def fakes(monkeypatch):
    calls = {"sentences": []}
    monkeypatch.setattr(run_module, "_prompt_texts", lambda m, r, s, classes: (
        f"A {m} of the {r}", [f"A {m} of a {c}." for c in classes]))

    def encode(sentences):
        calls["sentences"].extend(sentences)
        return np.stack([np.random.default_rng(len(s)).normal(size=12) for s in sentences])

    monkeypatch.setattr(run_module, "_sentence_encoder", lambda config: encode)
    model = FakeDuPLUS()
    # As the real loader: the weights' sha256 (from the sidecar it checks them against) comes along.
    monkeypatch.setattr(run_module, "_load_model", lambda path, device, config: (model, sha256_file(path), dict(config)))
    return calls, model


def test_stage_writes_the_documented_files(tmp_path, fakes):
    calls, model = fakes
    project = make_project(tmp_path)
    model_file = tmp_path / "model.safetensors"
    model_file.write_bytes(b"weights v1")
    out = tmp_path / "results" / "prognosis"
    summary = run_prognosis(project["config"], project["manifest"], FakePromptCache(), model_file, out)

    assert list(pd.read_csv(out / "summary.csv").columns) == SUMMARY_COLUMNS
    folds = pd.read_csv(out / "folds.csv")
    risks = pd.read_csv(out / "risks.csv", dtype={"patient_id": str})
    assert list(folds.columns) == FOLD_COLUMNS and list(risks.columns) == RISK_COLUMNS
    models = ["ehr_coxph", "ehr_rsf", "ehr_mlp", "ehr_text", "ehr_tabular_text", "image_mlp", "image_ehr_tabular",
              "image_ehr_text"]
    assert list(summary["model"]) == models
    assert len(folds) == 3 * len(models) and len(risks) == N * len(models)
    assert set(risks["patient_id"]) == {f"HN{i:02d}" for i in range(N)}
    km = json.loads((out / "km.json").read_text(encoding="utf-8"))
    assert set(km) == set(models)
    assert set(km["image_mlp"]) == {"low", "high", "logrank_p"}
    assert set(km["image_mlp"]["low"]) == {"time", "survival"}
    # One sentence per coded field, each distinct sentence encoded once (numbers go as numbers).
    assert "sex: male" in calls["sentences"] and "smoking: never" in calls["sentences"]
    assert len(calls["sentences"]) == len(set(calls["sentences"])) < N
    assert len(list((out / "features" / "demo_headneck_pet").glob("*.npy"))) == N
    cohort = json.loads((out / "cohort.json").read_text(encoding="utf-8"))
    assert cohort["patients"] == N and cohort["stratified_by"] == "event x center"
    assert cohort["ehr_only"] is False and cohort["text_encoding"] == "fields"
    # Bootstrap intervals around each fold mean; AUC at the cohort's event-time quartiles;
    # calibration at the median event time.
    assert (summary["harrell_c_ci_low"] <= summary["harrell_c_mean"]).all()
    assert (summary["harrell_c_mean"] <= summary["harrell_c_ci_high"]).all()
    auc = pd.read_csv(out / "auc.csv")
    assert list(auc.columns) == AUC_COLUMNS and len(auc) == 3 * len(models) * 3
    assert sorted(auc["horizon"].unique()) == pytest.approx(cohort["auc_horizons"]) and auc["auc"].notna().any()
    calibration = json.loads((out / "calibration.json").read_text(encoding="utf-8"))
    assert calibration["horizon"] == cohort["calibration_horizon"] and "ehr_coxph" in calibration["models"]
    assert risks["survival_at_horizon"].between(0, 1).all()

    # The cache is keyed by the weights file's hash (reuse itself is tested in test_features).
    encoded = model.encode_calls
    sidecar = out / "features" / "demo_headneck_pet" / "HN00.json"
    assert json.loads(sidecar.read_text(encoding="utf-8"))["data"]["model_sha256"] == cohort["model_sha256"]
    model_file.write_bytes(b"weights v2")
    run_prognosis(project["config"], project["manifest"], FakePromptCache(), model_file, out)
    assert model.encode_calls == encoded + N


def test_adapted_model_and_label_masks(tmp_path, fakes):
    project = make_project(tmp_path)
    config = project["config"]
    config["prognosis"].update(merge=["tabular"], tumour_mask="label")
    adapted = FakeDuPLUS(2)
    out = tmp_path / "out"
    summary = run_prognosis(config, [project["manifest"]], FakePromptCache(), tmp_path / "absent.safetensors",
                            out, model=adapted, model_key="base+adapter")
    assert "image_ehr_text" not in set(summary["model"]) and adapted.forward_calls == 0
    cached = out / "features" / "demo_headneck_pet"
    assert np.load(cached / "HN00.npy").shape == (5,)
    assert json.loads((cached / "HN00.json").read_text(encoding="utf-8"))["data"]["model_sha256"] == "base+adapter"


def test_unmatched_ehr_ids_stop_the_stage(tmp_path, fakes):
    project = make_project(tmp_path)
    clinical = tmp_path / "data" / "raw" / "demo_headneck_pet" / "clinical.csv"
    table = pd.read_csv(clinical)
    table.loc[0, "patient_id"] = "GHOST"
    table.to_csv(clinical, index=False)
    with pytest.raises(EHRError, match=r"clinical\.csv, column 'patient_id': 1 id\(s\) match no image case: GHOST"):
        run_prognosis(project["config"], project["manifest"], FakePromptCache(), tmp_path / "m", tmp_path / "out")


def test_disabled_stage_writes_a_note(tmp_path):
    out = tmp_path / "out"
    run_prognosis({"prognosis": {"enabled": False}}, tmp_path / "none.csv", None, tmp_path / "m", out)
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.columns) == SUMMARY_COLUMNS
    assert summary.loc[0, "model"] == "none" and "disabled" in summary.loc[0, "note"]
    assert json.loads((out / "km.json").read_text(encoding="utf-8")) == {}
    assert pd.read_csv(out / "folds.csv").empty


def test_a_cohort_without_events_warns_naming_the_column_and_still_writes_nan(tmp_path, fakes, caplog):
    project = make_project(tmp_path)
    clinical = tmp_path / "data" / "raw" / "demo_headneck_pet" / "clinical.csv"
    pd.read_csv(clinical).assign(relapse=0).to_csv(clinical, index=False)
    model_file = tmp_path / "model.safetensors"
    model_file.write_bytes(b"weights")
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="duplus.prognosis.ehr"):
        summary = run_prognosis(project["config"], project["manifest"], FakePromptCache(), model_file, out)
    assert "has no event (column 'relapse' is 0 for all 24 patients)" in caplog.text
    assert summary[["harrell_c_mean", "uno_c_mean", "ibs_mean"]].isna().all().all()
    folds = pd.read_csv(out / "folds.csv")
    assert folds["note"].str.contains("no events in training fold").all()
    assert json.loads((out / "km.json").read_text(encoding="utf-8")) == {}


def test_ehr_only_runs_the_ehr_routes_on_a_table_without_images(tmp_path, fakes):
    """prognosis.dataset: null: no manifest, model or prompts; every patient of the table is used."""
    calls, model = fakes
    project = make_project(tmp_path)
    config = project["config"]
    table = tmp_path / "data" / "raw" / "demo_headneck_pet" / "clinical.csv"
    config["prognosis"].update(dataset=None)
    config["prognosis"]["ehr"] = {**config["prognosis"]["ehr"], "table": str(table), "center": "center"}
    out = tmp_path / "out"
    summary = run_prognosis(config, None, None, tmp_path / "absent.safetensors", out)
    assert list(summary["model"]) == ["ehr_coxph", "ehr_rsf", "ehr_mlp", "ehr_text", "ehr_tabular_text"]
    assert summary["harrell_c_mean"].notna().all()
    cohort = json.loads((out / "cohort.json").read_text(encoding="utf-8"))
    assert cohort["ehr_only"] is True and cohort["patients"] == N and cohort["feature_dim"] is None
    assert cohort["stratified_by"] == "event x center"       # the table's center column
    assert model.encode_calls == 0 and not (out / "features").exists()


def test_leave_one_center_out_holds_out_each_center_once(tmp_path, fakes):
    config = make_project(tmp_path)["config"]
    table = tmp_path / "data" / "raw" / "demo_headneck_pet" / "clinical.csv"
    config["prognosis"].update(dataset=None, split="center", evaluation={"bootstrap": 20, "horizons": [5.0]})
    config["prognosis"]["ehr"] = {**config["prognosis"]["ehr"], "table": str(table), "center": "center"}
    out = tmp_path / "out"
    run_prognosis(config, None, None, tmp_path / "absent.safetensors", out)
    cohort = json.loads((out / "cohort.json").read_text(encoding="utf-8"))
    assert cohort["folds"] == 2 and cohort["stratified_by"].startswith("center (leave-one-center-out")
    risks = pd.read_csv(out / "risks.csv", dtype={"patient_id": str})
    centers = pd.read_csv(table, dtype={"patient_id": str}).set_index("patient_id")["center"]
    assert (risks.assign(center=risks["patient_id"].map(centers)).groupby("fold")["center"].nunique() == 1).all()
    assert set(pd.read_csv(out / "auc.csv")["horizon"]) == {5.0}


def test_fewer_events_than_folds_is_a_warning_in_cohort_json_naming_the_column(tmp_path, fakes):
    config = make_project(tmp_path)["config"]
    table = tmp_path / "data" / "raw" / "demo_headneck_pet" / "clinical.csv"
    clinical = pd.read_csv(table)
    clinical["relapse"] = [1, 1] + [0] * (N - 2)
    clinical.to_csv(table, index=False)
    config["prognosis"].update(dataset=None, evaluation={"bootstrap": 10})
    config["prognosis"]["ehr"] = {**config["prognosis"]["ehr"], "table": str(table)}
    run_prognosis(config, None, None, tmp_path / "absent.safetensors", tmp_path / "out")
    cohort = json.loads((tmp_path / "out" / "cohort.json").read_text(encoding="utf-8"))
    assert len(cohort["warnings"]) == 1 and "column 'relapse': 2 event(s) for 3 folds" in cohort["warnings"][0]


def test_ehr_only_without_a_table_says_which_keys(tmp_path, fakes):
    config = make_project(tmp_path)["config"]
    config["prognosis"].update(dataset=None)
    with pytest.raises(ConfigError, match="prognosis.dataset is null .* prognosis.ehr.table is null"):
        run_prognosis(config, None, None, tmp_path / "m", tmp_path / "out")


@pytest.mark.parametrize("change, message", [
    (dict(weight=np.nan), r"covariate\(s\) \['weight'\] missing in every row"),
    (dict(rfs_months=0.0), "column 'rfs_months': every patient has the same follow-up time 0"),
])
def test_a_cohort_that_cannot_be_analysed_is_one_error_naming_the_column(tmp_path, fakes, change, message):
    config = make_project(tmp_path)["config"]
    clinical = tmp_path / "data" / "raw" / "demo_headneck_pet" / "clinical.csv"
    pd.read_csv(clinical).assign(**change).to_csv(clinical, index=False)
    config["prognosis"].update(dataset=None)
    config["prognosis"]["ehr"] = {**config["prognosis"]["ehr"], "table": str(clinical)}
    with pytest.raises(EHRError, match=message):
        run_prognosis(config, None, None, tmp_path / "m", tmp_path / "out")
