"""Preprocessing: the array store and manifest of the contract, splits, user datasets, failure leaves outputs intact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from data_helpers import TINY, user_config

from duplus.data import preprocess
from duplus.data.download import run_download
from duplus.errors import DataError, IntegrityError
from duplus.hashing import sha256_file

COLUMNS = ["dataset", "case", "center", "modality", "sequence", "region", "split", "image", "label", "meta",
           "locations", "shape", "labels", "raw_image", "raw_label"]


@pytest.fixture(scope="module")
def demo_store(demo_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("preprocessed")
    for name in ("demo_abdomen_ct", "demo_abdomen_mri", "demo_headneck_pet"):
        preprocess.run_preprocess(name, TINY, demo_raw / name / "download.json", out / name / "manifest.csv", 1)
    return out


@pytest.mark.parametrize("name, modality, labels", [
    ("demo_abdomen_ct", "CT",
     {"1": "liver", "2": "right kidney", "3": "left kidney", "4": "spleen", "5": "liver tumor"}),
    ("demo_abdomen_mri", "MRI", {"1": "liver", "2": "right kidney", "3": "left kidney", "4": "spleen"}),
    ("demo_headneck_pet", "PET", {"1": "primary tumor", "2": "lymph node"}),
])
def test_manifest_and_arrays_follow_the_contract(demo_store: Path, name: str, modality: str, labels: dict) -> None:
    folder = demo_store / name
    manifest = pd.read_csv(folder / "manifest.csv", keep_default_na=False)
    assert list(manifest.columns) == COLUMNS
    assert set(manifest["modality"]) == {modality} and set(manifest["dataset"]) == {name}
    assert set(manifest["split"]) <= {"train", "test"}
    for center, rows in manifest.groupby("center"):
        assert (rows["split"] == "test").sum() >= 1 and (rows["split"] == "train").sum() >= 1, center
    for row in manifest.itertuples():
        assert json.loads(row.labels) == labels
        image = np.load(folder / row.image, mmap_mode="r")
        label = np.load(folder / row.label)
        assert image.dtype == np.float32 and label.dtype == np.uint8
        assert image.shape == label.shape == tuple(int(n) for n in row.shape.split("x"))
        assert set(np.unique(label).tolist()) <= {0, *map(int, labels)}
        assert np.isfinite(image).all()
        locations = np.load(folder / row.locations)
        for key in labels:
            points = locations[key]
            assert points.dtype == np.int32 and points.ndim == 2 and points.shape[1] == 3
            assert len(points) <= preprocess.MAX_LOCATIONS
            if len(points):
                assert (label[tuple(points.T)] == int(key)).all()
        meta = json.loads((folder / row.meta).read_text(encoding="utf-8"))
        assert meta["resampled"]["direction"] == [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0]
        assert meta["target_spacing"] == TINY["preprocess"]["spacing"]
        assert meta["original"]["orientation"] in ("LPS", "RAS", "LPI")
        assert Path(row.raw_image).is_absolute() and Path(row.raw_image).is_file()
        assert Path(row.raw_label).is_file()


def test_every_record_read_back_resolves_to_the_files_preprocessing_wrote(demo_store: Path) -> None:
    from duplus.data.manifest import read_manifest

    for name in ("demo_abdomen_ct", "demo_abdomen_mri", "demo_headneck_pet"):
        folder = demo_store / name
        rows = pd.read_csv(folder / "manifest.csv", dtype=str, keep_default_na=False).to_dict("records")
        records = read_manifest(folder / "manifest.csv")
        assert [(r.dataset, r.case, r.center, r.split) for r in records] == \
            [(row["dataset"], row["case"], row["center"], row["split"]) for row in rows]
        for record, row in zip(records, rows):
            assert record.image.is_absolute() and record.image.samefile(folder / row["image"])
            assert np.load(record.image, mmap_mode="r").shape == record.shape
            assert np.load(record.label).shape == record.shape
            assert record.meta.samefile(folder / row["meta"]) and record.locations.samefile(folder / row["locations"])
            assert record.label_map == {int(k): v for k, v in json.loads(row["labels"]).items()}
            assert record.sequence == (row["sequence"] or None)
            assert record.raw_label is not None and record.raw_label.samefile(row["raw_label"])


def test_ct_window_and_zscore(demo_store: Path) -> None:
    folder = demo_store / "demo_abdomen_ct"
    manifest = pd.read_csv(folder / "manifest.csv")
    meta = json.loads((folder / manifest["meta"][0]).read_text(encoding="utf-8"))
    assert meta["normalization"]["kind"] == "ct_window" and meta["normalization"]["clip"] == [-991.0, 500.0]
    image = np.load(folder / manifest["image"][0])
    low = (-991.0 - meta["normalization"]["mean"]) / meta["normalization"]["std"]
    assert image.min() >= low - 1e-4  # clipped before z-scoring
    label = np.load(folder / manifest["label"][0])
    assert abs(float(image[label > 0].mean())) < 2.0


def test_mri_is_clipped_at_body_percentiles(demo_store: Path) -> None:
    folder = demo_store / "demo_abdomen_mri"
    meta = json.loads((folder / pd.read_csv(folder / "manifest.csv")["meta"][0]).read_text(encoding="utf-8"))
    assert meta["normalization"]["kind"] == "percentiles" and meta["normalization"]["percentiles"] == [2.0, 98.0]


def test_siteB_was_reoriented_and_cropped(demo_store: Path) -> None:
    folder = demo_store / "demo_abdomen_ct"
    meta = json.loads((folder / "abdct_siteB_000" / "meta.json").read_text(encoding="utf-8"))
    assert meta["original"]["orientation"] == "RAS"
    full = [int(s) for s in meta["resampled"]["size"]][::-1]
    box = meta["crop_box"]
    assert any(b[1] - b[0] < n for b, n in zip(box, full))  # air around the body is cropped away


def test_splits_are_deterministic_and_per_center() -> None:
    rows = [{"case": f"c{i}", "center": "big"} for i in range(8)] + [{"case": "s0", "center": "small"},
                                                                      {"case": "s1", "center": "small"},
                                                                      {"case": "o0", "center": "one"}]
    preprocess.assign_splits(rows, seed=0, test_fraction=0.25)
    splits = {r["case"]: r["split"] for r in rows}
    assert sum(splits[f"c{i}"] == "test" for i in range(8)) == 2
    assert sorted([splits["s0"], splits["s1"]]) == ["test", "train"]
    assert splits["o0"] == "train"
    again = [dict(r, split=None) for r in rows]
    preprocess.assign_splits(again, seed=0, test_fraction=0.25)
    assert {r["case"]: r["split"] for r in again} == splits
    other = [dict(r, split=None) for r in rows]
    preprocess.assign_splits(other, seed=1, test_fraction=0.5)
    assert sum(r["split"] == "test" for r in other if r["center"] == "big") == 4


def test_the_cases_of_one_subject_share_their_split() -> None:
    """Two cardiac phases (M&Ms) or two studies (autoPET) of one person: never one in each split."""
    rows = [{"case": f"p{i}_{phase}", "center": "c", "subject": f"p{i}"} for i in range(40) for phase in ("ed", "es")]
    preprocess.assign_splits(rows, seed=0, test_fraction=0.25)
    by_subject: dict[str, set[str]] = {}
    for row in rows:
        by_subject.setdefault(row["subject"], set()).add(row["split"])
    assert all(len(splits) == 1 for splits in by_subject.values())
    assert sum(splits == {"test"} for splits in by_subject.values()) == 10  # a quarter of the subjects
    # Cases without a subject are split exactly as before subjects existed.
    alone = [{"case": f"c{i}", "center": "big"} for i in range(8)]
    with_none = [dict(r, subject=None) for r in alone]
    preprocess.assign_splits(alone, seed=0, test_fraction=0.25)
    preprocess.assign_splits(with_none, seed=0, test_fraction=0.25)
    assert [r["split"] for r in alone] == [r["split"] for r in with_none]


def _hashes(folder: Path) -> dict[str, str]:
    """The store as users see it (the hidden staging folder left out)."""
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.relative_to(folder).parts[0].startswith(".")}


def _arrays(folder: Path) -> dict[str, str]:
    return {name: digest for name, digest in _hashes(folder).items() if name.endswith(".npy")}


def test_user_msd_dataset_in_parallel_and_failures_leave_outputs_untouched(msd_folder, tmp_path: Path,
                                                                           monkeypatch) -> None:
    from duplus.data.staging import STAGING

    root = msd_folder(n=4)
    config = user_config(root)
    record = tmp_path / "raw" / "mydata" / "download.json"
    run_download("mydata", config, record)
    manifest_path = tmp_path / "pre" / "mydata" / "manifest.csv"
    frame = preprocess.run_preprocess("mydata", config, record, manifest_path, threads=2)
    assert list(frame["case"]) == ["case00", "case01", "case02", "case03"]
    assert set(frame["center"]) == {"north", "south"}
    assert json.loads(frame["labels"][0]) == {"1": "liver", "2": "liver tumor"}
    assert frame["raw_image"][0] == str((root / "imagesTr" / "case00.nii.gz").resolve())
    assert not (manifest_path.parent / STAGING).exists()
    before = _hashes(manifest_path.parent)

    # A worker that fails half-way: nothing of the new run is installed ...
    original = preprocess.process_case
    calls: list[str] = []

    def flaky(case, *args, **kwargs):
        calls.append(case.case_id)
        if case.case_id == "case02" and fail[0]:
            raise DataError("dataset mydata, case case02: simulated failure")
        return original(case, *args, **kwargs)

    fail = [True]
    monkeypatch.setattr(preprocess, "process_case", flaky)
    config["preprocess"]["spacing"] = [3.0, 3.0, 3.0]
    with pytest.raises(DataError, match="simulated failure"):
        preprocess.run_preprocess("mydata", config, record, manifest_path, threads=1)
    assert _hashes(manifest_path.parent) == before
    # ... and the rerun preprocesses only the cases the failed run had not finished.
    fail[0] = False
    calls.clear()
    resumed = preprocess.run_preprocess("mydata", config, record, manifest_path, threads=1)
    assert calls == ["case02", "case03"]
    assert not (manifest_path.parent / STAGING).exists()
    fresh_path = tmp_path / "fresh" / "mydata" / "manifest.csv"
    fresh = preprocess.run_preprocess("mydata", config, record, fresh_path, threads=1)
    assert _arrays(manifest_path.parent) == _arrays(fresh_path.parent) != _arrays(tmp_path / "none")
    columns = [c for c in fresh.columns if c not in ("raw_image", "raw_label")]
    pd.testing.assert_frame_equal(resumed[columns], fresh[columns])
    before = _hashes(manifest_path.parent)
    monkeypatch.setattr(preprocess, "process_case", original)

    # A dataset that fails its integrity check: nothing is written either.
    image = sitk.ReadImage(str(root / "imagesTr" / "case01.nii.gz"))
    sitk.WriteImage(image[:, :, :5], str(root / "labelsTr" / "case01.nii.gz"))
    with pytest.raises(IntegrityError, match="case case01"):
        preprocess.run_preprocess("mydata", config, record, manifest_path, threads=1)
    assert _hashes(manifest_path.parent) == before
    assert not [p for p in manifest_path.parent.iterdir() if p.name.startswith(".")]


def test_a_staged_case_is_reused_only_under_the_same_key(msd_folder, tmp_path: Path) -> None:
    from duplus.data.layouts import list_cases
    from duplus.data.registry import get_dataset
    from duplus.data.staging import case_key, mark_done, raw_file_hashes, staged_row
    from duplus.journal import Journal

    root = msd_folder(n=2)
    config = user_config(root)
    record = run_download("mydata", config, tmp_path / "raw" / "mydata" / "download.json")
    hashes = raw_file_hashes(record)
    case = list_cases(get_dataset("mydata", config), record["root"])[0]
    key = case_key(case, hashes, {"spacing": [3.0, 3.0, 3.0]})
    assert key is not None
    assert case_key(case, hashes, {"spacing": [2.0, 3.0, 3.0]}) != key  # other settings
    changed = {path: ("0" * 64 if path.endswith(f"{case.case_id}.nii.gz") and "images" in path else digest)
               for path, digest in hashes.items()}
    assert case_key(case, changed, {"spacing": [3.0, 3.0, 3.0]}) != key  # another raw image
    assert case_key(case, {}, {"spacing": [3.0, 3.0, 3.0]}) is None  # not in the record: never reused
    staging = tmp_path / "staging"
    (staging / case.case_id).mkdir(parents=True)
    assert staged_row(staging, case.case_id, key) is None  # folder without its record: unfinished
    mark_done(staging, case.case_id, key, {"case": case.case_id})
    assert staged_row(staging, case.case_id, key) == {"case": case.case_id}
    assert staged_row(staging, case.case_id, "other") is None
    (staging / case.case_id / "image.npy").write_bytes(b"written by a later, killed attempt")
    assert staged_row(staging, case.case_id, key) is None  # a file the record does not vouch for
    mark_done(staging, case.case_id, key, {"case": case.case_id})
    assert staged_row(staging, case.case_id, key) == {"case": case.case_id}
    (staging / case.case_id / "image.npy").write_bytes(b"replaced")
    assert staged_row(staging, case.case_id, key) is None  # a file changed since it was vouched for
    Journal(staging).record_path(case.case_id).write_text("{trunc")
    assert staged_row(staging, case.case_id, key) is None


def test_record_of_another_dataset_is_refused(demo_raw: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="records dataset 'demo_abdomen_ct', expected 'demo_abdomen_mri'"):
        preprocess.run_preprocess("demo_abdomen_mri", TINY, demo_raw / "demo_abdomen_ct" / "download.json",
                                  tmp_path / "m.csv", 1)


def test_user_csv_dataset_preprocesses(msd_folder, tmp_path: Path) -> None:
    root = msd_folder(n=3)
    table = tmp_path / "list.csv"
    rows = [f"{root}/imagesTr/case0{i}.nii.gz,{root}/labelsTr/case0{i}.nii.gz,{'AB'[i % 2]}" for i in range(3)]
    table.write_text("image,label,center\n" + "\n".join(rows) + "\n")
    config = user_config(table, kind="csv")
    record = tmp_path / "raw" / "mydata" / "download.json"
    assert run_download("mydata", config, record)["root"] == str(table.resolve())
    (tmp_path / "pre" / "mydata" / ".staging-killed").mkdir(parents=True)  # left by a killed run
    frame = preprocess.run_preprocess("mydata", config, record, tmp_path / "pre" / "mydata" / "manifest.csv", 1)
    assert list(frame["center"]) == ["A", "B", "A"]
    assert list(frame[frame["center"] == "A"]["split"]).count("test") == 1
    assert not (tmp_path / "pre" / "mydata" / ".staging-killed").exists()


def test_a_declared_class_no_case_holds_is_warned_about(msd_folder, tmp_path: Path, caplog) -> None:
    config = user_config(msd_folder(n=2))
    config["datasets"]["mydata"]["labels"][7] = "pancreas"  # declared, but no label image has a 7
    record = tmp_path / "raw" / "mydata" / "download.json"
    run_download("mydata", config, record)
    with caplog.at_level("WARNING"):
        preprocess.run_preprocess("mydata", config, record, tmp_path / "pre" / "mydata" / "manifest.csv", 1)
    assert "label id(s) 7 (pancreas) of datasets.mydata.labels occur in none of its 2 cases" in caplog.text
    assert "1 (liver)" not in caplog.text


def test_test_cases_are_cropped_by_the_body_alone_training_cases_keep_every_label():
    body = np.full((40, 40, 40), -1000.0, np.float32)
    body[10:30, 10:30, 10:30] = np.linspace(0.0, 80.0, 20, dtype=np.float32)  # soft tissue, not constant
    label = np.zeros(body.shape, np.uint8)
    label[15:20, 15:20, 15:20] = 1
    label[36, 36, 36] = 1  # an annotation outside the body
    image, mask = sitk.GetImageFromArray(body), sitk.GetImageFromArray(label)
    options = preprocess.settings({"preprocess": {"spacing": [1.0, 1.0, 1.0]}})
    _, _, train = preprocess.transform_case(image, mask, "CT", options, crop=True)
    _, _, test = preprocess.transform_case(image, mask, "CT", options, crop=True, label_in_crop=False)
    assert all(high > 36 for _, high in train["crop_box"])  # the training crop keeps the stray label
    assert all(high <= 36 for _, high in test["crop_box"])  # the test crop knows nothing of the labels


def test_each_case_is_cropped_as_its_split_says(demo_store: Path):
    frame = pd.read_csv(demo_store / "demo_abdomen_ct" / "manifest.csv")
    for _, row in frame.iterrows():
        meta = json.loads((demo_store / "demo_abdomen_ct" / row["meta"]).read_text(encoding="utf-8"))
        assert meta["split"] == row["split"]
