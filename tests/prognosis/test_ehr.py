"""EHR table validation: each malformed table raises EHRError naming file, column and ids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from duplus.errors import EHRError
from duplus.prognosis.ehr import EHRSchema, load_ehr

GOOD = """patient_id,rfs_months,relapse,age,weight,center,tobacco,alcohol,performance_status,gender,hpv,surgery,chemotherapy
HN-001,12.5,1,63,80.5,CHUM,current,1,1,M,positive,0,1
HN-002,40,0,55,,CHUP,never,0,0,F,negative,1,0
HN-003,7.25,1,71,66,CHUM,,,2,1,,0,1
007,30,0,49,90,HGJ,former,0,1.0,0,0,,0
"""
IMAGES = ["HN-001", "HN-002", "HN-003", "007"]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "clinical.csv"
    path.write_text(text)
    return path


def edit(row: int, column: str, value: str) -> str:
    lines = GOOD.strip().split("\n")
    header = lines[0].split(",")
    cells = lines[row].split(",")
    cells[header.index(column)] = value
    lines[row] = ",".join(cells)
    return "\n".join(lines) + "\n"


def test_valid_table_is_typed_and_normalized(tmp_path, schema):
    table = load_ehr(write(tmp_path, GOOD), schema, image_ids=IMAGES)
    frame = table.frame
    assert list(table.ids) == IMAGES                       # "007" keeps its leading zeros
    assert table.time.tolist() == [12.5, 40.0, 7.25, 30.0]
    assert table.event.tolist() == [True, False, True, False]
    assert np.isnan(frame.loc[1, "weight"]) and frame.loc[0, "weight"] == 80.5
    assert frame["gender"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert frame["hpv"].tolist()[:2] == [1.0, 0.0] and np.isnan(frame.loc[2, "hpv"])
    assert frame["performance_status"].tolist() == ["1", "0", "2", "1"]   # 1.0 and 1 are one level
    assert pd.isna(frame.loc[2, "tobacco"])
    assert table.unmatched == []


@pytest.mark.parametrize("text, column, fragment", [
    (GOOD.replace("relapse,", "relapsed,"), "relapse", "missing column(s) ['relapse']"),
    (edit(2, "patient_id", "HN-001"), "patient_id", "duplicate id(s) HN-001 at row 2 (id HN-001), row 3 (id HN-001)"),
    (edit(2, "rfs_months", "-3"), "rfs_months", "negative time at row 3 (id HN-002)"),
    (edit(3, "rfs_months", ""), "rfs_months", "missing follow-up time at row 4 (id HN-003)"),
    (edit(1, "rfs_months", "soon"), "rfs_months", "non-numeric follow-up time at row 2 (id HN-001)"),
    (edit(4, "relapse", "2"), "relapse", "event must be 0 or 1, found ['2'] at row 5 (id 007)"),
    (edit(4, "relapse", ""), "relapse", "at row 5 (id 007)"),
    (edit(1, "age", "sixty"), "age", "non-numeric value(s) ['sixty'] at row 2 (id HN-001)"),
    (edit(3, "weight", "inf"), "weight", "infinite value at row 4 (id HN-003)"),
    (edit(4, "age", "-inf"), "age", "infinite value at row 5 (id 007)"),
    (edit(2, "gender", "X"), "gender", "binary value(s) ['X']"),
    (edit(1, "patient_id", ""), "patient_id", "missing id at row 2"),
])
def test_malformed_table_names_file_column_and_rows(tmp_path, schema, text, column, fragment):
    path = write(tmp_path, text)
    with pytest.raises(EHRError) as raised:
        load_ehr(path, schema, image_ids=IMAGES)
    message = str(raised.value)
    assert str(path) in message
    assert f"'{column}'" in message or f"['{column}']" in message
    assert fragment in message


def test_ids_without_image_are_listed(tmp_path, schema):
    path = write(tmp_path, GOOD)
    with pytest.raises(EHRError) as raised:
        load_ehr(path, schema, image_ids=["HN-001", "HN-002"])
    message = str(raised.value)
    assert str(path) in message and "'patient_id'" in message
    assert "HN-003, 007" in message and "allow_unmatched" in message


def test_unmatched_ids_are_dropped_when_allowed(tmp_path, schema):
    table = load_ehr(write(tmp_path, GOOD), schema, image_ids=["HN-001", "007", "HN-999"], allow_unmatched=True)
    assert list(table.ids) == ["HN-001", "007"]
    assert table.unmatched == ["HN-002", "HN-003"]
    flag = EHRSchema(**{**schema.__dict__, "allow_unmatched": True})
    assert list(load_ehr(write(tmp_path, GOOD), flag, image_ids=["007"]).ids) == ["007"]


def test_missing_file_and_conflicting_roles(tmp_path, schema):
    with pytest.raises(EHRError, match="nowhere.csv does not exist"):
        load_ehr(tmp_path / "nowhere.csv", schema)
    with pytest.raises(EHRError, match="'age' is listed as both numeric and binary"):
        EHRSchema.from_config({"prognosis": {"ehr": {"numeric": ["age"], "binary": ["age"]}}})


def test_in_memory_table_with_boolean_events(schema):
    from duplus.prognosis.ehr import validate_ehr

    frame = pd.read_csv(__import__("io").StringIO(GOOD), dtype={"patient_id": str})
    frame["relapse"] = frame["relapse"].astype(bool)
    table = validate_ehr(frame, schema, source="frame")
    assert table.event.tolist() == [True, False, True, False]
