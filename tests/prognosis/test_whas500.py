"""On real patients (WHAS500, shipped with scikit-survival) the EHR-only MLP comes close to Cox PH."""

from __future__ import annotations

import numpy as np
import pytest

from duplus.prognosis import evaluate as ev
from duplus.prognosis.ehr import EHRSchema, validate_ehr
from duplus.prognosis.heads import MLPSettings
from duplus.prognosis.models import Cohort, ModelSettings


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


@pytest.mark.learning
def test_ehr_mlp_comes_within_003_of_cox_on_the_same_folds():
    """Two 3-fold splits (fold seeds 0 and 1), the MLP seeded alike, compared fold by fold with Cox PH.

    Checked on fold seeds 0-3: Cox PH 0.758-0.772, MLP minus Cox -0.014 to -0.001 per split, the
    same to the last digit under ATEN_CPU_CAPABILITY=default and =avx2 with 1 and 2 threads (AMD
    EPYC, AVX2). One split alone against Cox's fold std (the old form) failed on fold seed 1
    (gap -0.011 against a std of 0.007).
    """
    cohort = whas500_cohort()
    gaps, cox_means = [], []
    for seed in (0, 1):
        folds, how = ev.make_folds(cohort.event, None, 3, seed=seed)
        assert how == "event"
        settings = ModelSettings(mlp=MLPSettings(epochs=120, hidden=32, seed=seed))
        result = ev.cross_validate(cohort, ["ehr_coxph", "ehr_mlp"], folds, settings)
        assert np.isfinite(result.folds["ibs"]).all()
        summary = ev.summarize(result.folds).set_index("model")
        cox_means.append(summary.loc["ehr_coxph", "harrell_c_mean"])
        gaps.append(summary.loc["ehr_mlp", "harrell_c_mean"] - cox_means[-1])
    assert all(0.7 < c < 0.85 for c in cox_means), cox_means   # published range for this table
    assert np.mean(gaps) > -0.03, gaps
