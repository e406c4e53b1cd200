"""Calibration at one horizon: each model's predicted survival S(h | x) against the Kaplan-Meier
survival at h of the patients it put in the same group (results/prognosis/calibration.json).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from sksurv.nonparametric import kaplan_meier_estimator


def default_calibration_horizon(time: np.ndarray, event: np.ndarray) -> float | None:
    """The median event time of the cohort (None without events): half the events have happened,
    so both the predicted and the observed survival are away from 0 and 1."""
    time = np.asarray(time, dtype=float)[np.asarray(event, dtype=bool)]
    return float(np.median(time)) if time.size else None


def km_at(time: np.ndarray, event: np.ndarray, horizon: float) -> float:
    """Kaplan-Meier survival at ``horizon``; NaN when everyone left follow-up before it (the
    estimate would be carried past the last observation)."""
    if not len(time) or float(np.max(time)) < horizon:
        return math.nan
    times, survival = kaplan_meier_estimator(np.asarray(event, bool), np.asarray(time, float))
    before = times <= horizon
    return float(survival[before][-1]) if before.any() else 1.0


def calibration(risks: pd.DataFrame, horizon: float | None, n_groups: int = 5) -> dict[str, Any]:
    """``{"horizon": h, "models": {model: {"predicted": [...], "observed": [...], "n": [...]}}}``.

    Out-of-fold patients of each model are split into ``n_groups`` groups of equal size by their
    predicted S(h | x) (risks' ``survival_at_horizon``): predicted survival is a probability, on
    one scale for every fold's model, so unlike risk scores it may be pooled over folds. A model
    without survival predictions is left out; a group whose follow-up ends before h has observed
    null.
    """
    out: dict[str, Any] = {"horizon": horizon, "models": {}}
    if horizon is None or "survival_at_horizon" not in risks.columns:
        return out
    for model in dict.fromkeys(risks["model"]):
        part = risks[(risks["model"] == model) & np.isfinite(risks["survival_at_horizon"].astype(float))]
        if len(part) < n_groups:
            continue
        order = np.argsort(part["survival_at_horizon"].to_numpy(float), kind="stable")
        entry: dict[str, list[Any]] = {"predicted": [], "observed": [], "n": []}
        for group in np.array_split(order, n_groups):
            rows = part.iloc[group]
            observed = km_at(rows["time"].to_numpy(float), rows["event"].to_numpy(bool), float(horizon))
            entry["predicted"].append(float(rows["survival_at_horizon"].mean()))
            entry["observed"].append(observed if math.isfinite(observed) else None)
            entry["n"].append(int(len(rows)))
        out["models"][model] = entry
    return out
