"""Shared fixtures of the prognosis tests: EHR schema (torch's thread count: tests/conftest.py)."""

from __future__ import annotations

import pytest

from duplus.prognosis.ehr import EHRSchema

HEADNECK = {
    "prognosis": {"ehr": {
        "table": None, "id": "patient_id", "time": "rfs_months", "event": "relapse",
        "numeric": ["age", "weight"], "categorical": ["center", "tobacco", "alcohol", "performance_status"],
        "binary": ["gender", "hpv", "surgery", "chemotherapy"], "allow_unmatched": False,
        # As the demo config.yaml describes its columns.
        "center": "center", "treatments": ["surgery", "chemotherapy"],
        "columns": {"age": {"unit": "years"}, "weight": {"unit": "kg"},
                    "gender": {"name": "sex", "labels": {1: "male", 0: "female"}},
                    "hpv": {"name": "HPV status", "labels": {1: "positive", 0: "negative"}},
                    "tobacco": {"name": "smoking"}, "alcohol": {"name": "alcohol use"},
                    "performance_status": {"name": "ECOG performance status"}}}},
}


@pytest.fixture
def schema() -> EHRSchema:
    return EHRSchema.from_config(HEADNECK)
