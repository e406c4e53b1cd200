"""The evaluate stage on a small fake dataset: original-space scoring, output files and their columns.

The data and prompt packages are replaced by small fakes, so only this package's logic is tested.
"""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

from duplus.data.manifest import CaseRecord, read_manifest, select_cases
from duplus.evaluate import case_scores as cases_module
from duplus.evaluate.evaluate_stage import evaluate_cases, run_evaluate, summarize
from duplus.model import DuPLUS, ModelConfig, save_model

TEXT_DIM = 4
CLASS_CODE = {"liver": 0.0, "liver tumor": 1.0}
SPACING_XYZ = (0.8, 1.2, 3.0)


class FakeCache:
    dim = TEXT_DIM

    def get(self, text):
        vector = torch.zeros(TEXT_DIM)
        if text.startswith("tgt"):
            vector[1] = CLASS_CODE[text.split(" ", 2)[2]]
        return vector

    def get_many(self, texts):
        return torch.stack([self.get(t) for t in texts])


class OracleModel(torch.nn.Module):
    """Liver where intensity > 0.5, tumour where > 1.5: the class comes from the target embedding."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, image, modality, context, targets):
        threshold = 0.5 + targets[:, 1].reshape(1, -1, 1, 1, 1)
        return 20.0 * (image - threshold)


def _label():
    label = np.zeros((6, 14, 12), np.uint8)  # Z, Y, X of the original grid
    label[1:5, 3:11, 2:9] = 1
    label[2:4, 5:8, 3:6] = 2
    return label


@pytest.fixture()
def dataset(tmp_path, monkeypatch):
    """Two test cases and one training case; the preprocessed grid is the original flipped along X."""
    root = tmp_path / "pre" / "demo"
    rows = []
    for case, center, split in [("c1", "siteA", "test"), ("c2", "siteB", "test"), ("c3", "siteA", "train")]:
        label = _label()
        folder = root / case
        folder.mkdir(parents=True)
        np.save(folder / "image.npy", np.flip(label.astype(np.float32), axis=2).copy())
        (folder / "meta.json").write_text(json.dumps({"flip": 2}))
        raw = sitk.GetImageFromArray(label)
        raw.SetSpacing(SPACING_XYZ)
        raw.SetOrigin((10.0, -5.0, 2.0))
        sitk.WriteImage(raw, str(tmp_path / f"{case}_label.nii.gz"))
        sitk.WriteImage(sitk.Cast(raw, sitk.sitkFloat32), str(tmp_path / f"{case}_image.nii.gz"))
        rows.append(dict(dataset="demo", case=case, center=center, modality="CT", sequence=np.nan, region="abdomen",
                         split=split, image=f"{case}/image.npy", label="", meta=f"{case}/meta.json", locations="",
                         shape="6x14x12", labels=json.dumps({"1": "liver", "2": "liver tumor"}),
                         raw_image=str(tmp_path / f"{case}_image.nii.gz"), raw_label=str(tmp_path / f"{case}_label.nii.gz")))
    manifest = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)

    monkeypatch.setattr(cases_module, "context_text", lambda m, r, s: f"ctx {m} {r}")
    monkeypatch.setattr(cases_module, "target_text", lambda m, c, s: f"tgt {m} {c}")
    monkeypatch.setattr(cases_module, "restore_mask", lambda masks, k, meta: np.flip(masks[k], axis=meta["flip"]).astype(bool))

    def read_array(path):
        image = sitk.ReadImage(str(path))
        return sitk.GetArrayFromImage(image), tuple(reversed(image.GetSpacing()))

    def label_masks(label, label_map, classes):
        ids = {"liver": (1, 2), "liver tumor": (2,)}
        return np.stack([np.isin(label, ids[c]) for c in classes])

    monkeypatch.setattr(cases_module, "read_array", read_array)
    monkeypatch.setattr(cases_module, "label_masks", label_masks)
    return manifest


CONFIG = {
    "device": "cpu",
    "pretrain": {"patch_size": [16, 16, 16]},
    "inference": {"overlap": 0.5, "sw_batch_size": 2, "blend": "gaussian", "threshold": 0.5},
    "evaluate": {"split": "test", "nsd_tolerance_mm": 2.0, "max_cases_per_dataset": 0},
}


def test_oracle_scores_perfectly_in_original_space(dataset):
    cases = select_cases(read_manifest(dataset), split="test")
    per_case = evaluate_cases(OracleModel(), cases, FakeCache(), CONFIG)
    assert list(per_case.columns) == ["dataset", "case", "center", "class", "dice", "hd95", "nsd"]
    assert sorted(per_case["class"].unique()) == ["liver", "liver tumor"]
    assert (per_case["dice"] == 1.0).all() and (per_case["hd95"] == 0.0).all()
    assert set(per_case["center"]) == {"siteA", "siteB"}


def test_run_evaluate_writes_the_documented_files(dataset, tmp_path, monkeypatch):
    import duplus.prompts.cache as cache_module

    monkeypatch.setattr(cache_module.PromptCache, "load", classmethod(lambda cls, path: FakeCache()))
    torch.manual_seed(0)
    model_path = tmp_path / "model" / "model.safetensors"
    save_model(DuPLUS(ModelConfig.preset("tiny", text_dim=TEXT_DIM)), model_path, {"text_encoder": "fake"})
    out = tmp_path / "out"
    config = {**CONFIG, "evaluate": {**CONFIG["evaluate"], "max_cases_per_dataset": 1}}
    run_evaluate(config, [str(dataset)], "cache.safetensors", str(model_path), str(out))

    per_case = pd.read_csv(out / "per_case.csv")
    assert list(per_case.columns) == ["dataset", "case", "center", "class", "dice", "hd95", "nsd"]
    assert len(per_case) == 2 and per_case["case"].nunique() == 1  # capped at one case ...
    assert set(per_case["case"]) <= {"c1", "c2"}  # ... of the test split
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.columns) == ["dataset", "class", "dice", "hd95", "nsd", "n", "hd95_n"]
    assert summary[summary["class"] == "mean"]["n"].tolist() == [1]
    efficiency = json.loads((out / "efficiency.json").read_text(encoding="utf-8"))
    for key in ("params", "macs_per_window", "window", "seconds_per_volume", "peak_rss_mb", "class_scaling_ratio", "device"):
        assert key in efficiency
    assert efficiency["window"] == [16, 16, 16] and efficiency["class_scaling_ratio"] > 0
    example = np.load(out / "examples" / "demo.npz")
    assert example["pred"].shape == example["truth"].shape == (2, 6, 14, 12)
    assert example["image"].shape == (6, 14, 12) and list(example["classes"]) == ["liver", "liver tumor"]
    assert np.allclose(example["spacing"], SPACING_XYZ[::-1])


def test_summary_means_ignore_nan_distances():
    per_case = pd.DataFrame(
        [dict(dataset="d", case="a", center="x", **{"class": "k", "dice": 0.0, "hd95": np.nan, "nsd": 0.0}),
         dict(dataset="d", case="b", center="x", **{"class": "k", "dice": 1.0, "hd95": 4.0, "nsd": 1.0})]
    )
    summary = summarize(per_case)
    row = summary[summary["class"] == "k"].iloc[0]
    assert row["dice"] == 0.5 and row["hd95"] == 4.0 and row["n"] == 2
    assert row["hd95_n"] == 1  # the miss has no distance: the HD95 mean covers one case of two
    mean = summary[summary["class"] == "mean"].iloc[0]
    assert mean["hd95_n"] == 1 and mean["n"] == 2


def test_a_killed_evaluation_resumes_with_the_cases_it_finished(dataset, tmp_path, monkeypatch):
    import duplus.prompts.cache as cache_module
    from duplus.evaluate.case_journal import FOLDER

    monkeypatch.setattr(cache_module.PromptCache, "load", classmethod(lambda cls, path: FakeCache()))
    torch.manual_seed(0)
    model_path = tmp_path / "model" / "model.safetensors"
    save_model(DuPLUS(ModelConfig.preset("tiny", text_dim=TEXT_DIM)), model_path, {"text_encoder": "fake"})
    real_predict = cases_module.predict_masks
    predicted = []

    def predict(model, image, *args, **kwargs):
        predicted.append(image.sum())
        if fail_after[0] is not None and len(predicted) > fail_after[0]:
            raise KeyboardInterrupt  # the job is killed while predicting
        return real_predict(model, image, *args, **kwargs)

    monkeypatch.setattr(cases_module, "predict_masks", predict)
    fail_after = [None]
    run_evaluate(CONFIG, [str(dataset)], "cache.safetensors", str(model_path), str(tmp_path / "fresh"))
    assert len(predicted) == 2 and not (tmp_path / "fresh" / FOLDER).exists()  # done: no journal left

    out = tmp_path / "out"
    predicted.clear()
    fail_after[0] = 1
    with pytest.raises(KeyboardInterrupt):
        run_evaluate(CONFIG, [str(dataset)], "cache.safetensors", str(model_path), str(out))
    assert len(list((out / FOLDER).glob("*.json"))) == 1 and not (out / "per_case.csv").exists()

    predicted.clear()
    fail_after[0] = None
    run_evaluate(CONFIG, [str(dataset)], "cache.safetensors", str(model_path), str(out))
    assert len(predicted) == 1  # only the case the killed run had not finished
    for name in ("per_case.csv", "summary.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(out / name), pd.read_csv(tmp_path / "fresh" / name))
    fresh, resumed = np.load(tmp_path / "fresh" / "examples" / "demo.npz"), np.load(out / "examples" / "demo.npz")
    assert all(np.array_equal(fresh[k], resumed[k]) for k in fresh.files)
    assert json.loads((out / "efficiency.json").read_text(encoding="utf-8"))["cases_resumed"] == 1
    assert not (out / FOLDER).exists()


def test_a_journal_entry_is_reused_only_under_the_same_key(dataset, tmp_path, monkeypatch):
    from duplus.evaluate.case_journal import CaseJournal

    cases = select_cases(read_manifest(dataset), split="test")
    calls = []
    real_predict = cases_module.predict_masks
    monkeypatch.setattr(cases_module, "predict_masks", lambda *a, **k: calls.append(1) or real_predict(*a, **k))

    def evaluate(model_key="m1", settings=None):
        journal = CaseJournal(tmp_path / "out", model_key, settings or {"threshold": 0.5})
        calls.clear()
        frame_out = cases_module.evaluate_each(OracleModel(), cases, FakeCache(), CONFIG, journal=journal).frame()
        return frame_out, len(calls)

    first, n = evaluate()
    assert n == 2
    again, n = evaluate()
    assert n == 0
    pd.testing.assert_frame_equal(first, again)
    assert evaluate(model_key="m2")[1] == 2  # other weights
    assert evaluate(settings={"threshold": 0.6})[1] == 2  # other settings
    evaluate()
    image = dataset.parent / "c1" / "image.npy"
    np.save(image, np.load(image) * 1.0 + 0.0)  # same numbers rewritten: same content, reused
    assert evaluate()[1] == 0
    np.save(image, np.load(image) + 1.0)  # the preprocessed image changed: c1 is evaluated again
    assert evaluate()[1] == 1
    for record in (tmp_path / "out" / ".cases").glob("*.json"):
        record.write_text("{truncated")  # unreadable entries are evaluated again, never an error
    assert evaluate()[1] == 2

    def with_example():
        journal = CaseJournal(tmp_path / "out", "m1", {"threshold": 0.5})
        calls.clear()
        result = cases_module.evaluate_each(OracleModel(), cases, FakeCache(), CONFIG, keep_examples=True,
                                            journal=journal)
        return result, len(calls)

    assert with_example()[1] == 1  # the first case is kept as the example: its entry had none
    result, n = with_example()
    assert n == 0 and set(result.examples) == {"demo"}
    example = next((tmp_path / "out" / ".cases").glob("*.npz"))
    example.write_bytes(example.read_bytes()[:100])  # a damaged example: that case is evaluated again
    assert with_example()[1] == 1


def _record(case, center, split):
    return CaseRecord(dataset="d", case=case, center=center, modality="CT", sequence=None, region="abdomen",
                      split=split, image=Path(case), label=Path(case), meta=Path(case), locations=Path(case),
                      shape=(1, 1, 1), label_map={1: "liver"}, raw_image=None, raw_label=None)


def test_a_case_cap_draws_from_every_center_not_the_first_in_name_order():
    from duplus.evaluate.evaluate_stage import cases_to_evaluate

    records = [_record(f"{c}_{i:02d}", c, "test") for c in ("siteA", "siteB", "siteC") for i in range(5)]
    records.append(_record("train_01", "siteA", "train"))
    capped = cases_to_evaluate(records, {"evaluate": {"max_cases_per_dataset": 3}, "seed": 1})
    assert sorted(c.center for c in capped) == ["siteA", "siteB", "siteC"]
    assert [c.case for c in capped] == sorted(c.case for c in capped)  # stably ordered
    assert capped == cases_to_evaluate(records[::-1], {"evaluate": {"max_cases_per_dataset": 3}, "seed": 1})
    six = cases_to_evaluate(records, {"evaluate": {"max_cases_per_dataset": 6}, "seed": 1})
    assert Counter(c.center for c in six) == {"siteA": 2, "siteB": 2, "siteC": 2}
    assert len(cases_to_evaluate(records, {"evaluate": {}})) == 15
