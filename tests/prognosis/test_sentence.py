"""The record as text: one sentence per field, worded from the config's descriptions only."""

from __future__ import annotations

import numpy as np
import pytest

from duplus.errors import EHRError
from duplus.prognosis.ehr import EHRSchema, validate_ehr
from duplus.prognosis.sentence import ehr_to_sentence, field_sentences


def test_the_demo_row_reads_as_its_descriptions(schema):
    row = {"patient_id": "HN-1", "rfs_months": 10.0, "relapse": 1, "age": 63.0, "weight": np.nan,
           "center": "CHUM", "tobacco": "current", "alcohol": None, "performance_status": "1",
           "gender": 1.0, "hpv": 1.0, "surgery": 0.0, "chemotherapy": 1.0}
    assert field_sentences(row, schema) == {
        "age": "age: 63 years", "weight": "weight: unknown", "center": "center: CHUM", "tobacco": "smoking: current",
        "alcohol": "alcohol use: unknown", "performance_status": "ECOG performance status: 1", "gender": "sex: male",
        "hpv": "HPV status: positive", "surgery": "not treated with surgery", "chemotherapy": "treated with chemotherapy"}
    # The one-sentence form leaves missing fields out; outcome columns never appear.
    assert ehr_to_sentence(row, schema) == (
        "age: 63 years; center: CHUM; smoking: current; ECOG performance status: 1; sex: male; "
        "HPV status: positive; not treated with surgery; treated with chemotherapy.")
    assert ehr_to_sentence(dict(reversed(list(row.items()))), schema) == ehr_to_sentence(row, schema)


def test_no_column_is_guessed_from_its_name():
    """A tumour subsite called 'site', an institution called 'inst', a sex coded 1/2 and a column
    called 'surgery' read as what they are: no center, no treatment, no sex unless the config says."""
    schema = EHRSchema(id="pid", time="t", event="e", numeric=("age",), categorical=("site", "inst", "sex"),
                       binary=("surgery",))
    row = {"age": 51.0, "site": "2", "inst": "2", "sex": "2", "surgery": 1.0}
    assert ehr_to_sentence(row, schema) == "age: 51; site: 2; inst: 2; sex: 2; surgery: yes."


def test_config_descriptions_name_units_labels_center_and_treatments():
    """The issue's head-and-neck cohort: sex coded 1/2, subsite 'site', institution 'inst'."""
    config = {"prognosis": {"ehr": {
        "id": "pid", "time": "t", "event": "e", "numeric": ["age", "Karnofsky_score"],
        "categorical": ["site", "sex"], "binary": ["chemo"], "center": "inst", "treatments": ["chemo"],
        "columns": {"age": {"unit": "years"}, "Karnofsky_score": {},
                    "sex": {"labels": {1: "male", 2: "female"}},
                    "site": {"name": "tumour subsite", "labels": {2: "oropharynx"}},
                    "inst": {"name": "center"}, "chemo": {"name": "chemotherapy"}}}}}
    schema = EHRSchema.from_config(config)
    frame = {"pid": ["a", "b"], "t": [3.0, 4.0], "e": [1, 0], "age": [51.0, 70.5], "Karnofsky_score": [80, None],
             "site": [2, 3], "sex": [2, 1], "chemo": ["yes", "no"], "inst": [2, 5]}
    import pandas as pd

    table = validate_ehr(pd.DataFrame(frame), schema)
    rows = table.frame.to_dict("records")
    assert ehr_to_sentence(rows[0], schema) == ("age: 51 years; Karnofsky score: 80; tumour subsite: oropharynx; "
                                                "sex: female; treated with chemotherapy; center: 2.")
    assert field_sentences(rows[1], schema) == {
        "age": "age: 70.5 years", "Karnofsky_score": "Karnofsky score: unknown", "site": "tumour subsite: 3",
        "sex": "sex: male", "chemo": "not treated with chemotherapy", "inst": "center: 5"}


def test_binary_labels_are_keyed_like_the_values():
    schema = EHRSchema.from_config({"prognosis": {"ehr": {
        "id": "pid", "time": "t", "event": "e", "numeric": [], "categorical": [], "binary": ["hpv"],
        "columns": {"hpv": {"name": "p16", "labels": {"pos": "positive", "neg": "negative"}}}}}})
    assert field_sentences({"hpv": 1.0}, schema) == {"hpv": "p16: positive"}
    assert field_sentences({"hpv": 0.0}, schema) == {"hpv": "p16: negative"}


def test_description_mistakes_are_one_error():
    base = {"id": "pid", "time": "t", "event": "e", "numeric": ["age"], "categorical": [], "binary": ["hpv"]}
    with pytest.raises(EHRError, match=r"treatments \['age'\] are not listed under binary"):
        EHRSchema.from_config({"prognosis": {"ehr": {**base, "treatments": ["age"]}}})
    with pytest.raises(EHRError, match="center 't' is the id, time or event column"):
        EHRSchema.from_config({"prognosis": {"ehr": {**base, "center": "t"}}})
