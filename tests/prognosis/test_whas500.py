"""On real patients (WHAS500, shipped with scikit-survival) the EHR-only MLP matches Cox PH."""

from __future__ import annotations

import numpy as np

from duplus.prognosis import evaluate as ev
from duplus.prognosis.heads import MLPSettings
from duplus.prognosis.models import Cohort, ModelSettings
from duplus.prognosis.ehr import EHRSchema, validate_ehr


def whas500_cohort() -> Cohort:
    from sksurv.datasets import load_whas500

    X, y = load_whas500()
    frame = X.copy()
    frame["pid"] = [f"W{i}" for i in range(len(frame))]
    frame["lenfol"], frame["fstat"] = y["lenfol"], y["fstat"]
    schema = EHRSchema(id="pid", time="lenfol", event="fstat", numeric=("age", "bmi", "diasbp", "hr", "los", "sysbp"),
                       binary=("afb", "av3", "chf", "cvd", "gender", "miord", "mitype", "sho"))
    table = validate_ehr(frame, schema, source="sksurv whas500")
    return Cohort(ids=table.ids, time=table.time, event=table.event, ehr=table.frame, schema=schema)


def test_ehr_mlp_is_within_one_std_of_cox_on_the_same_folds():
    cohort = whas500_cohort()
    folds, how = ev.make_folds(cohort.event, None, 3, seed=0)
    assert how == "event"
    settings = ModelSettings(mlp=MLPSettings(epochs=120, hidden=32))
    result = ev.cross_validate(cohort, ["ehr_coxph", "ehr_mlp"], folds, settings)
    summary = ev.summarize(result.folds).set_index("model")
    cox, mlp = summary.loc["ehr_coxph"], summary.loc["ehr_mlp"]
    assert 0.7 < cox["harrell_c_mean"] < 0.85                  # published range for this table
    assert mlp["harrell_c_mean"] >= cox["harrell_c_mean"] - cox["harrell_c_std"]
    assert np.isfinite(result.folds["ibs"]).all()
