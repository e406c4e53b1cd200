"""The manifest module: its one reader refuses what it cannot use, naming every problem; selection by split and center."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from duplus.data.manifest import COLUMNS, case_of, read_manifest, read_manifests, select_cases, write_manifest
from duplus.errors import DataError


def _row(case: str, center: str = "siteA", split: str = "train", **changes) -> dict:
    row = {"dataset": "toy", "case": case, "center": center, "modality": "MRI", "sequence": "", "region": "brain",
           "split": split, "image": f"{case}/image.npy", "label": f"{case}/label.npy", "meta": f"{case}/meta.json",
           "locations": f"{case}/locations.npz", "shape": "4x5x6", "labels": json.dumps({"0": "background", "1": "liver"}),
           "raw_image": f"/data/{case}_0000.nii.gz", "raw_label": f"/data/{case}.nii.gz"}
    return {**row, **changes}


def test_written_rows_read_back_as_records(tmp_path: Path):
    manifest = tmp_path / "toy" / "manifest.csv"
    manifest.parent.mkdir()
    frame = write_manifest(manifest, [_row("a", sequence="T1", background_values={"7": 3}), _row("b")])
    assert list(frame.columns) == list(pd.read_csv(manifest).columns) == list(COLUMNS)  # extra keys left out
    first, second = read_manifest(manifest)
    assert first.image == manifest.parent.resolve() / "a" / "image.npy" and first.shape == (4, 5, 6)
    assert first.sequence == "T1" and second.sequence is None  # an empty sequence is no sequence, not "nan"
    assert first.label_map == {1: "liver"} and first.classes == ["liver"]  # background is no class
    assert first.raw_label == Path("/data/a.nii.gz") and first.where == "toy/a"


def test_a_row_of_a_pandas_frame_with_missing_values_gives_the_same_record(tmp_path: Path):
    row = _row("a", sequence=float("nan"))
    assert case_of(row, tmp_path) == case_of(_row("a"), tmp_path)
    assert case_of(_row("a", raw_image=""), tmp_path).raw_image is None


def test_every_missing_column_is_named(tmp_path: Path):
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame([_row("a")]).drop(columns=["meta", "raw_label"]).to_csv(manifest, index=False)
    with pytest.raises(DataError, match=r"manifest.csv: missing column\(s\) \['meta', 'raw_label'\]"):
        read_manifest(manifest)
    with pytest.raises(DataError, match="manifest not found"):
        read_manifest(tmp_path / "absent.csv")


def test_every_unreadable_row_is_named_at_once(tmp_path: Path):
    manifest = tmp_path / "manifest.csv"
    rows = [_row("a", shape="4x5"), _row("b"), _row("c", labels=json.dumps({"0": "background"}))]
    pd.DataFrame(rows).to_csv(manifest, index=False)
    with pytest.raises(DataError) as error:
        read_manifest(manifest)
    message = str(error.value)
    assert "case 'toy/a': shape '4x5' is not 'ZxYxX'" in message and "case 'toy/c': labels names no class" in message
    assert "toy/b" not in message


def test_selection_by_split_dataset_and_center(tmp_path: Path):
    manifest = tmp_path / "manifest.csv"
    write_manifest(manifest, [_row("a"), _row("b", center="siteB"), _row("c", split="test"),
                              _row("d", center="siteB", split="test")])
    records = read_manifests([manifest])
    assert [r.case for r in select_cases(records)] == ["a", "b"]  # the train split by default
    assert [r.case for r in select_cases(records, split=None, centers=["siteB"])] == ["b", "d"]
    assert [r.case for r in select_cases(records, split="test", exclude_centers={"toy": ["siteA"]})] == ["d"]
    assert select_cases(records, datasets=["other"]) == []
