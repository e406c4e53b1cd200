"""ehr_to_sentence: exact, deterministic text; missing fields are left out."""

from __future__ import annotations

import numpy as np

from duplus.prognosis.ehr import EHRSchema
from duplus.prognosis.sentence import ehr_to_sentence


def test_full_row(schema):
    row = {"patient_id": "HN-1", "rfs_months": 10.0, "relapse": 1, "age": 63.0, "weight": np.nan,
           "center": None, "tobacco": "current", "alcohol": None, "performance_status": "1",
           "gender": 1.0, "hpv": 1.0, "surgery": 0.0, "chemotherapy": 1.0}
    assert ehr_to_sentence(row, schema) == ("A 63-year-old male, HPV positive, current smoker, "
                                            "performance status 1, treated with chemotherapy.")


def test_every_field_and_fixed_order(schema):
    row = {"age": 47.9, "weight": 72.25, "center": "CHUM", "tobacco": "0", "alcohol": "1",
           "performance_status": "0", "gender": 0.0, "hpv": 0.0, "surgery": 1.0, "chemotherapy": 1.0}
    assert ehr_to_sentence(row, schema) == (
        "A 47-year-old female, weighing 72.2 kg, HPV negative, non-smoker, drinks alcohol, "
        "performance status 0, center CHUM, treated with surgery and chemotherapy.")
    assert ehr_to_sentence(dict(reversed(list(row.items()))), schema) == ehr_to_sentence(row, schema)


def test_missing_fields_are_omitted(schema):
    assert ehr_to_sentence({"age": np.nan, "gender": np.nan}, schema) == "A patient."
    assert ehr_to_sentence({"gender": "F", "tobacco": "former", "surgery": 0.0, "chemotherapy": 0.0},
                           schema) == "A female, former smoker, no surgery or chemotherapy."


def test_unknown_columns_use_their_names():
    schema = EHRSchema(id="pid", time="t", event="e", numeric=("bmi",), categorical=("t_stage",), binary=("chf",))
    assert ehr_to_sentence({"bmi": 24.04, "t_stage": "T2", "chf": 0.0, "t": 5, "e": 1}, schema) == \
        "A patient, bmi 24, t stage T2, no chf."
