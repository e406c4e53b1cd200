"""Bootstrap intervals of the cross-validated C-indices, time-dependent AUC at set horizons,
calibration at one horizon and leave-one-center-out folds, on scikit-survival's WHAS500."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sksurv.datasets import load_whas500
from sksurv.metrics import concordance_index_censored, concordance_index_ipcw, cumulative_dynamic_auc
from sksurv.util import Surv

from duplus.errors import ConfigError
from duplus.prognosis import evaluate as ev
from duplus.prognosis.calibration import calibration, km_at
from duplus.prognosis.intervals import INTERVAL_COLUMNS, _weighted_c, bootstrap_intervals, pair_matrices, uno_weights
from duplus.prognosis.models import ModelSettings


def whas_risks(n_folds: int = 5, noise: float = 0.0, seed: int = 0) -> pd.DataFrame:
    """Out-of-fold 'risks' of a fixed score (age + noise) on WHAS500, as cross_validate writes them."""
    X, y = load_whas500()
    rng = np.random.default_rng(seed)
    risk = X["age"].to_numpy(float) + noise * rng.normal(size=len(X))
    return pd.DataFrame({"patient_id": [f"W{i}" for i in range(len(X))], "fold": np.arange(len(X)) % n_folds,
                         "model": "age", "risk": risk, "time": y["lenfol"].astype(float),
                         "event": y["fstat"].astype(int)})


def test_pair_matrices_give_sksurvs_harrell_and_uno_c_on_a_resample_with_repeats():
    risks = whas_risks().iloc[:120]
    rng = np.random.default_rng(3)
    drawn = rng.integers(0, 120, 120)                       # a bootstrap resample, patients repeated
    counts = np.bincount(drawn, minlength=120).astype(float)[None, :]
    event, time, risk = risks["event"].to_numpy(bool), risks["time"].to_numpy(float), risks["risk"].to_numpy()
    risk = np.round(risk / 5) * 5                            # tied risks count one half
    score, comparable = pair_matrices(event, time, risk)
    expected = concordance_index_censored(event[drawn], time[drawn], risk[drawn])[0]
    assert _weighted_c(counts, score, comparable, np.ones(120))[0] == pytest.approx(expected, abs=1e-12)

    train = whas_risks().iloc[120:]
    y_train = Surv.from_arrays(train["event"].to_numpy(bool), train["time"].to_numpy(float))
    y_test = Surv.from_arrays(event, time)
    tau = 1000.0
    weight = uno_weights(y_train, y_test, tau)
    expected = concordance_index_ipcw(y_train, y_test[drawn], risk[drawn], tau=tau)[0]
    assert _weighted_c(counts, score, comparable, weight)[0] == pytest.approx(expected, abs=1e-12)


def test_bootstrap_interval_holds_the_fold_mean_is_seeded_and_narrows_with_a_stronger_signal():
    risks = whas_risks(noise=5.0)
    folds = pd.DataFrame([{"model": "age", "fold": k, "harrell_c": concordance_index_censored(
        part["event"].astype(bool), part["time"], part["risk"])[0]} for k, part in risks.groupby("fold")])
    intervals = bootstrap_intervals(risks, 400, seed=0)
    assert list(intervals.columns) == ["model", *INTERVAL_COLUMNS]
    row = intervals.iloc[0]
    mean = folds["harrell_c"].mean()
    assert row["harrell_c_ci_low"] < mean < row["harrell_c_ci_high"]
    assert row["uno_c_ci_low"] < row["uno_c_ci_high"]
    assert 0.02 < row["harrell_c_ci_high"] - row["harrell_c_ci_low"] < 0.15
    pd.testing.assert_frame_equal(intervals, bootstrap_intervals(risks, 400, seed=0))
    assert not intervals.equals(bootstrap_intervals(risks, 400, seed=1))
    noisy = bootstrap_intervals(whas_risks(noise=60.0), 400, seed=0).iloc[0]
    assert noisy["harrell_c_ci_high"] < row["harrell_c_ci_low"]       # pure noise ranks worse, clearly


def test_bootstrap_without_events_or_with_failed_fits_is_nan_not_an_error():
    risks = whas_risks().assign(event=0)
    assert bootstrap_intervals(risks, 50)[INTERVAL_COLUMNS].isna().all().all()
    failed = whas_risks().assign(risk=math.nan)
    assert bootstrap_intervals(failed, 50)[INTERVAL_COLUMNS].isna().all().all()


def test_auc_at_horizons_is_sksurvs_inside_the_fold_and_nan_with_a_reason_outside():
    risks = whas_risks()
    test, train = risks[risks["fold"] == 0], risks[risks["fold"] != 0]
    y_train = Surv.from_arrays(train["event"].astype(bool), train["time"])
    y_test = Surv.from_arrays(test["event"].astype(bool), test["time"])
    rows = ev.horizon_auc(y_train, y_test, test["risk"].to_numpy(), [365.0, 1e6])
    # Outcomes past the last training time are censored there, as survival_metrics does.
    y_ipcw = ev.censor_after(y_test, float(train["time"].max()))
    expected = cumulative_dynamic_auc(y_train, y_ipcw, test["risk"].to_numpy(), [365.0])[0][0]
    assert rows[0] == (365.0, pytest.approx(expected), "")
    assert math.isnan(rows[1][1]) and "outside the fold's follow-up" in rows[1][2]
    quartiles = ev.default_horizons(risks["time"], risks["event"].astype(bool))
    assert len(quartiles) == 3 and np.all(np.diff(quartiles) > 0)


def test_calibration_of_true_survival_matches_kaplan_meier():
    rng = np.random.default_rng(0)
    rate = rng.choice([0.02, 0.05, 0.1, 0.2, 0.4], size=2000)
    event_time, censor = rng.exponential(1 / rate), rng.uniform(0, 40, size=2000)
    risks = pd.DataFrame({"model": "truth", "fold": 0, "time": np.minimum(event_time, censor),
                          "event": (event_time <= censor).astype(int), "survival_at_horizon": np.exp(-rate * 5)})
    result = calibration(risks, 5.0)
    curve = result["models"]["truth"]
    assert result["horizon"] == 5.0 and sum(curve["n"]) == 2000
    np.testing.assert_allclose(curve["observed"], curve["predicted"], atol=0.05)
    assert math.isnan(km_at(np.array([1.0, 2.0]), np.array([True, False]), 3.0))
    # Risks without survival predictions (an older risks.csv) give no curve.
    assert calibration(risks.drop(columns="survival_at_horizon"), 5.0)["models"] == {}


def test_leave_one_center_out_holds_out_whole_centers():
    center = np.array(["B", "A", "C", "A", "B", "C", "C"])
    folds, how = ev.center_folds(center)
    assert folds.tolist() == [1, 0, 2, 0, 1, 2, 2] and how.startswith("center (leave-one-center-out: A, B, C")
    with pytest.raises(ConfigError, match="prognosis.ehr.center"):
        ev.center_folds(None)
    with pytest.raises(ConfigError, match="at least two centers"):
        ev.center_folds(np.array(["A", "A"]))


def test_baseline_settings_come_from_the_config():
    settings = ModelSettings.from_config({"prognosis": {"baselines": {"cox_alpha": 2.5, "rsf_trees": 7,
                                                                      "rsf_min_leaf": 11}}})
    assert (settings.cox_alpha, settings.rsf_trees, settings.rsf_min_leaf) == (2.5, 7, 11)
