"""Shared fixtures of the prognosis tests: EHR schema (torch's thread count: tests/conftest.py)."""

from __future__ import annotations

import pytest

from duplus.prognosis.ehr import EHRSchema

HEADNECK = {
    "prognosis": {"ehr": {
        "table": None, "id": "patient_id", "time": "rfs_months", "event": "relapse",
        "numeric": ["age", "weight"], "categorical": ["center", "tobacco", "alcohol", "performance_status"],
        "binary": ["gender", "hpv", "surgery", "chemotherapy"], "allow_unmatched": False}},
}


@pytest.fixture
def schema() -> EHRSchema:
    return EHRSchema.from_config(HEADNECK)
