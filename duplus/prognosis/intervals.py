"""Bootstrap 95 % intervals of the cross-validated Harrell's and Uno's C from the out-of-fold risks.

Why per fold and not over the pooled out-of-fold risks: the risks of different folds come from
different fitted models whose scales need not agree (an MLP's especially), so a pair of patients
from two folds is not a meaningful comparison; pooling would mix such pairs into the C-index. Each
replicate therefore resamples the test patients of every fold (with replacement, within the fold),
takes C per fold on those patients, and averages over the folds as the point estimate does; the
interval is the 2.5 and 97.5 percentiles of that replicate mean. Fitted models are kept fixed:
the interval covers the sampling of test patients, not refitting (which would cost folds x
resamples fits).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from sksurv.nonparametric import CensoringDistributionEstimator
from sksurv.util import Surv

from duplus.prognosis.evaluate import censor_after, evaluation_times

INTERVAL_COLUMNS = ["harrell_c_ci_low", "harrell_c_ci_high", "uno_c_ci_low", "uno_c_ci_high"]
# sksurv's tolerance for tied risks (concordance_index_censored's tied_tol).
TIED_TOL = 1e-8


def pair_matrices(event: np.ndarray, time: np.ndarray, risk: np.ndarray) -> np.ndarray:
    """S[i, j]: 1 for a concordant comparable pair, 0.5 for tied risks, 0 discordant or not comparable.

    Comparable as in sksurv: i has an event and j is observed longer, or censored at i's time.
    Written as a matrix (not sksurv's loop) because a bootstrap replicate is then a pair of
    multinomial count vectors around it: numerator and denominator of thousands of replicates are
    two matrix products instead of thousands of calls.
    """
    event = np.asarray(event, bool)
    later = time[None, :] > time[:, None]
    censored_at_same = (time[None, :] == time[:, None]) & ~event[None, :]
    comparable = event[:, None] & (later | censored_at_same)
    tied = np.abs(risk[None, :] - risk[:, None]) <= TIED_TOL
    score = np.where(tied, 0.5, (risk[None, :] < risk[:, None]).astype(float))
    return comparable * score, comparable.astype(float)


def _weighted_c(counts: np.ndarray, score: np.ndarray, comparable: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """C of each replicate (rows of ``counts``: how often each patient was drawn); NaN without a pair."""
    numerator = np.einsum("bi,ij,bj->b", counts * weight, score, counts)
    denominator = np.einsum("bi,ij,bj->b", counts * weight, comparable, counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), math.nan)


def uno_weights(y_train: np.ndarray, y_test: np.ndarray, tau: float) -> np.ndarray:
    """Squared inverse probability of censoring weights, 0 at or after ``tau`` (concordance_index_ipcw)."""
    time = y_test[y_test.dtype.names[1]]
    weight = np.zeros(len(y_test))
    before = time < tau
    if before.any():
        estimator = CensoringDistributionEstimator().fit(y_train)
        weight[before] = np.square(estimator.predict_ipcw(y_test[before]))
    return weight


def bootstrap_intervals(risks: pd.DataFrame, n_resamples: int, seed: int = 0,
                        grid: np.ndarray | None = None, level: float = 0.95) -> pd.DataFrame:
    """Percentile intervals of the fold-mean Harrell's and Uno's C per model.

    Args:
        risks: out-of-fold risks (``evaluate.RISK_COLUMNS``): patient_id, fold, model, risk, time, event.
        n_resamples: bootstrap replicates (config ``prognosis.evaluation.bootstrap``); 0 gives NaN.
        seed: replicates are drawn from this seed, the same for every model.
        grid: the cohort's evaluation times (``evaluate.cohort_times``); Uno's tau per fold is
            chosen from it as in ``evaluate.survival_metrics``.
    Returns: one row per model, columns ``model`` + ``INTERVAL_COLUMNS``; NaN where no replicate
        has a defined C (no events, failed fits).
    """
    rows = []
    alpha = (1 - level) / 2 * 100
    for model in dict.fromkeys(risks["model"]):
        part = risks[risks["model"] == model]
        rng = np.random.default_rng(seed)
        harrell, uno = [], []
        for fold in sorted(part["fold"].unique()):
            test = part[part["fold"] == fold]
            train = part[part["fold"] != fold]
            risk = test["risk"].to_numpy(float)
            event, time = test["event"].to_numpy(bool), test["time"].to_numpy(float)
            # Drawn before any skip so that every fold's draw does not depend on the others' data.
            counts = rng.multinomial(len(test), np.full(len(test), 1 / len(test)), size=n_resamples).astype(float)
            if n_resamples == 0 or not np.isfinite(risk).all() or not event.any() or not len(train):
                continue
            score, comparable = pair_matrices(event, time, risk)
            harrell.append(_weighted_c(counts, score, comparable, np.ones(len(test))))
            y_train = Surv.from_arrays(train["event"].to_numpy(bool), train["time"].to_numpy(float))
            times = evaluation_times(train["time"].to_numpy(float), time, event, grid=grid)
            if times.size and train["event"].any():
                y_test = censor_after(Surv.from_arrays(event, time), float(train["time"].max()))
                weight = uno_weights(y_train, y_test, float(times.max()))
                score_u, comparable_u = pair_matrices(y_test["event"], y_test["time"], risk)
                uno.append(_weighted_c(counts, score_u, comparable_u, weight))
        row: dict[str, Any] = {"model": model}
        for name, per_fold in (("harrell_c", harrell), ("uno_c", uno)):
            low = high = math.nan
            if per_fold:
                stacked = np.stack(per_fold)
                defined = np.isfinite(stacked).any(axis=0)
                if defined.any():
                    means = np.nanmean(stacked[:, defined], axis=0)
                    low, high = (float(v) for v in np.percentile(means, [alpha, 100 - alpha]))
            row[f"{name}_ci_low"], row[f"{name}_ci_high"] = low, high
        rows.append(row)
    return pd.DataFrame(rows, columns=["model", *INTERVAL_COLUMNS])
