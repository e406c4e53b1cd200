"""Cross-validated comparison of the survival models on shared folds, with scikit-survival metrics
(Harrell's C, Uno's C, mean time-dependent AUC, integrated Brier score) and Kaplan-Meier risk groups.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold
from sksurv.compare import compare_survival
from sksurv.metrics import concordance_index_censored, concordance_index_ipcw, cumulative_dynamic_auc, integrated_brier_score
from sksurv.nonparametric import kaplan_meier_estimator
from sksurv.util import Surv

from duplus.errors import ConfigError
from duplus.prognosis.models import Cohort, ModelSettings, fit_predict
from duplus.progress import progress

log = logging.getLogger(__name__)

METRICS = ("harrell_c", "uno_c", "ibs", "mean_auc")
FOLD_COLUMNS = ["model", "fold", *METRICS, "note"]
# *_ci_low / *_ci_high: bootstrap 95 % interval of the fold mean (intervals.bootstrap_intervals).
SUMMARY_COLUMNS = ["model", "harrell_c_mean", "harrell_c_std", "uno_c_mean", "uno_c_std", "ibs_mean", "ibs_std",
                   "mean_auc_mean", "mean_auc_std", "harrell_c_ci_low", "harrell_c_ci_high", "uno_c_ci_low",
                   "uno_c_ci_high", "note"]
# survival_at_horizon: the model's S(h | x) at the calibration horizon h (cohort.json), NaN when
# the model gives no survival function or h is not set.
RISK_COLUMNS = ["patient_id", "fold", "model", "risk", "time", "event", "survival_at_horizon"]
AUC_COLUMNS = ["model", "fold", "horizon", "auc", "note"]


def make_folds(event: np.ndarray, center: np.ndarray | None, n_folds: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """Fold index (0..n_folds-1) per patient, and how the folds were stratified.

    Stratified by event x center when every such stratum has at least ``n_folds`` patients, else by
    event alone. With fewer events (or censored patients) than folds, events and then censored
    patients are dealt round-robin over a seeded shuffle ("dealt"): as many folds as there are
    events hold one, where plain KFold could leave most folds without any.
    """
    event = np.asarray(event).astype(bool)
    n = len(event)
    if n < n_folds:
        raise ValueError(f"prognosis: {n} patients cannot be split into {n_folds} folds")
    candidates: list[tuple[str, np.ndarray]] = []
    if center is not None:
        candidates.append(("event x center", np.char.add(np.char.add(event.astype(int).astype(str), "|"),
                                                         np.asarray(center).astype(str))))
    candidates.append(("event", event.astype(int).astype(str)))
    folds = np.empty(n, dtype=int)
    indices = np.arange(n)
    for how, key in candidates:
        _, counts = np.unique(key, return_counts=True)
        if counts.min() >= n_folds:
            splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
            for k, (_, test) in enumerate(splitter.split(indices, key)):
                folds[test] = k
            return folds, how
    order = np.random.default_rng(seed).permutation(n)
    # The censored patients continue the count where the events stopped, so fold sizes differ by
    # at most one.
    dealt = np.concatenate([order[event[order]], order[~event[order]]])
    folds[dealt] = np.arange(n) % n_folds
    return folds, "dealt"


def center_folds(center: np.ndarray | None) -> tuple[np.ndarray, str]:
    """Leave-one-center-out: fold k holds every patient of the k-th center (sorted by name), as
    HECKTOR's test set holds out whole centers; a model is never tested on a center it saw."""
    if center is None:
        raise ConfigError("config prognosis.split is 'center' (leave-one-center-out) but the cohort has no center: "
                          "name the center column in prognosis.ehr.center (or use images whose manifest has one)")
    names, folds = np.unique(np.asarray(center).astype(str), return_inverse=True)
    if len(names) < 2:
        raise ConfigError(f"config prognosis.split is 'center' but every patient is in center '{names[0]}': "
                          f"leave-one-center-out needs at least two centers")
    return folds.astype(int), "center (leave-one-center-out: " + ", ".join(names) + ")"


def cohort_times(time: np.ndarray, event: np.ndarray, n_times: int = 16) -> np.ndarray:
    """One grid for every fold: percentiles 10-80 of the whole cohort's event times.

    Folds then share their AUC times, Uno's horizon and Brier integration range (per-fold
    percentiles would average metrics taken at different horizons); only outcome times are used,
    never a prediction, so no fold's model sees anything of its test fold.
    """
    time = np.asarray(time, dtype=float)
    event = np.asarray(event, dtype=bool)
    source = time[event] if event.any() else time
    return np.unique(np.percentile(source, np.linspace(10, 80, n_times))) if source.size else np.empty(0)


def evaluation_times(train_time: np.ndarray, test_time: np.ndarray, test_event: np.ndarray,
                     n_times: int = 8, grid: np.ndarray | None = None) -> np.ndarray:
    """Times for time-dependent AUC and Brier scores: ``grid`` (``cohort_times``), else percentiles
    10-80 of the test event times; kept from the fold's first test event (before it an AUC has no
    case) to below its last follow-up and its last training time, where the censoring distribution
    fitted on the training fold is still defined."""
    source = test_time[test_event] if np.any(test_event) else test_time
    if grid is not None:
        candidates = np.unique(np.asarray(grid, dtype=float))
    else:
        candidates = np.unique(np.percentile(source, np.linspace(10, 80, n_times)))
    upper = min(float(np.max(test_time)), float(np.max(train_time)))
    return candidates[(candidates >= float(np.min(source))) & (candidates < upper)]


def default_horizons(time: np.ndarray, event: np.ndarray) -> np.ndarray:
    """Quartiles (25, 50, 75 %) of the cohort's event times: where a time-dependent AUC has cases
    and controls in most folds; used when config ``prognosis.evaluation.horizons`` is not set."""
    time = np.asarray(time, dtype=float)[np.asarray(event, dtype=bool)]
    return np.unique(np.percentile(time, [25, 50, 75])) if time.size else np.empty(0)


def horizon_auc(y_train: np.ndarray, y_test: np.ndarray, risk: np.ndarray,
                horizons: Sequence[float]) -> list[tuple[float, float, str]]:
    """(horizon, cumulative/dynamic AUC, note) per horizon on one test fold; a horizon outside the
    fold's evaluable range (before its first event, at or after its last follow-up or last
    training time) is NaN with the reason, as is every horizon of a fold without events."""
    event_field, time_field = y_test.dtype.names
    test_event = y_test[event_field].astype(bool)
    test_time = y_test[time_field].astype(float)
    train_time = y_train[y_train.dtype.names[1]].astype(float)
    risk = np.asarray(risk, dtype=float)
    out: list[tuple[float, float, str]] = []
    if not test_event.any() or not np.isfinite(risk).all():
        why = "no events in test fold" if not test_event.any() else "non-finite risk predictions"
        return [(float(h), math.nan, why) for h in horizons]
    first, upper = float(test_time[test_event].min()), min(float(test_time.max()), float(train_time.max()))
    y_ipcw = censor_after(y_test, float(train_time.max()))
    for h in horizons:
        h = float(h)
        if not first <= h < upper:
            out.append((h, math.nan, f"horizon {h:g} outside the fold's follow-up [{first:g}, {upper:g})"))
            continue
        try:
            out.append((h, float(cumulative_dynamic_auc(y_train, y_ipcw, risk, [h])[0][0]), ""))
        except (ValueError, ZeroDivisionError) as error:
            out.append((h, math.nan, f"auc at {h:g}: {error}"))
    return out


def survival_metrics(y_train: np.ndarray, y_test: np.ndarray, risk: np.ndarray,
                     survival: Callable[[np.ndarray], np.ndarray] | None = None,
                     grid: np.ndarray | None = None) -> dict[str, Any]:
    """Harrell's C, Uno's C (tau = the last evaluation time), mean cumulative/dynamic AUC and the
    integrated Brier score of one test fold; an undefined metric is NaN and its reason is in
    ``note`` (never an exception).

    Args:
        y_train, y_test: structured (event, time) arrays (``sksurv.util.Surv.from_arrays``).
        risk: test risk scores, higher = earlier event.
        survival: times -> S(t | x) of the test rows, (n_test, len(times)); None skips the IBS.
        grid: the cohort's evaluation times (``cohort_times``); None takes them from this fold.
    """
    event_field, time_field = y_test.dtype.names
    test_event = y_test[event_field].astype(bool)
    test_time = y_test[time_field].astype(float)
    train_time = y_train[y_train.dtype.names[1]].astype(float)
    result: dict[str, Any] = {m: math.nan for m in METRICS}
    notes: list[str] = []
    risk = np.asarray(risk, dtype=float)
    if not np.isfinite(risk).all():
        return {**result, "note": "non-finite risk predictions"}
    if not test_event.any():
        return {**result, "note": "no events in test fold: metrics undefined"}
    if test_event.all():
        notes.append("no censored patients in test fold")
    try:
        result["harrell_c"] = float(concordance_index_censored(test_event, test_time, risk)[0])
    except (ValueError, ZeroDivisionError) as error:
        notes.append(f"harrell_c: {error}")
    times = evaluation_times(train_time, test_time, test_event, grid=grid)
    if times.size == 0:
        notes.append("no evaluation time inside both training and test follow-up: uno_c, auc, ibs undefined")
        return {**result, "note": "; ".join(notes)}
    # Outcomes at or after the last training time are censored there: the censoring distribution
    # is estimated on the training fold and may drop to zero at that time (its patient censored).
    # Every evaluation time lies below it, so no metric needs those outcomes uncensored.
    y_ipcw = censor_after(y_test, float(np.max(train_time)))
    try:
        result["uno_c"] = float(concordance_index_ipcw(y_train, y_ipcw, risk, tau=float(times.max()))[0])
    except (ValueError, ZeroDivisionError) as error:
        notes.append(f"uno_c: {error}")
    try:
        result["mean_auc"] = float(cumulative_dynamic_auc(y_train, y_ipcw, risk, times)[1])
    except (ValueError, ZeroDivisionError) as error:
        notes.append(f"mean_auc: {error}")
    if survival is None:
        notes.append("ibs: model gives no survival function")
    elif times.size < 2:
        notes.append("ibs: needs two evaluation times, the test fold has one")
    else:
        try:
            result["ibs"] = float(integrated_brier_score(y_train, y_ipcw, survival(times), times))
        except (ValueError, ZeroDivisionError) as error:
            notes.append(f"ibs: {error}")
    result["note"] = "; ".join(notes)
    return result


def censor_after(y: np.ndarray, limit: float) -> np.ndarray:
    event_field, time_field = y.dtype.names
    late = y[time_field] >= limit
    if not late.any():
        return y
    return Surv.from_arrays(event=y[event_field] & ~late, time=np.minimum(y[time_field], limit),
                            name_event=event_field, name_time=time_field)


@dataclass
class CVResult:
    """Per-fold metrics, out-of-fold risks, and each test patient's risk group (high = above the
    median risk of that fold's training patients, so no test outcome or test risk sets it)."""

    folds: pd.DataFrame
    risks: pd.DataFrame
    groups: pd.DataFrame          # patient_id, model, high (bool), time, event
    auc: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=AUC_COLUMNS))


def cross_validate(cohort: Cohort, models: Sequence[str], folds: np.ndarray,
                   settings: ModelSettings, horizons: Sequence[float] = (),
                   calibration_horizon: float | None = None) -> CVResult:
    """Fit and score every model on every fold; all models see exactly the same folds.

    horizons: times of the time-dependent AUC (``CVResult.auc``); calibration_horizon: the time
    at which each test patient's predicted survival is kept (risks' ``survival_at_horizon``).
    """
    folds = np.asarray(folds)
    fold_rows, risk_rows, group_rows, auc_rows = [], [], [], []
    grid = cohort_times(cohort.time, cohort.event)
    jobs = [(k, name) for k in np.unique(folds) for name in models]
    for k, name in progress(jobs, desc="prognosis cross-validation", total=len(jobs)):
        test = np.flatnonzero(folds == k)
        train = np.flatnonzero(folds != k)
        y_train, y_test = cohort.y(train), cohort.y(test)
        center_note = _centers_without_events(cohort, test)
        if not cohort.event[train].any():
            fit, metrics = None, {**{m: math.nan for m in METRICS}, "note": "no events in training fold"}
        else:
            try:
                fit = fit_predict(name, cohort, train, test, settings, fold=int(k))
            except (ValueError, np.linalg.LinAlgError, RuntimeError) as error:
                log.warning("prognosis: %s failed on fold %d: %s", name, k, error)
                fit, metrics = None, {**{m: math.nan for m in METRICS}, "note": f"fit failed: {error}"}
            else:
                metrics = survival_metrics(y_train, y_test, fit.risk_test, fit.survival, grid)
        if fit is None:
            auc_rows += [{"model": name, "fold": int(k), "horizon": float(h), "auc": math.nan, "note": metrics["note"]}
                         for h in horizons]
        else:
            auc_rows += [{"model": name, "fold": int(k), "horizon": h, "auc": a, "note": why}
                         for h, a, why in horizon_auc(y_train, y_test, fit.risk_test, horizons)]
        at_horizon = np.full(len(test), math.nan)
        if fit is not None and fit.survival is not None and calibration_horizon is not None:
            survival = fit.survival(np.array([float(calibration_horizon)]))
            at_horizon = np.asarray(survival, dtype=float).reshape(len(test), -1)[:, 0]
        note = "; ".join(n for n in (metrics.pop("note"), center_note) if n)
        fold_rows.append({"model": name, "fold": int(k), **metrics, "note": note})
        risk_test = fit.risk_test if fit is not None else np.full(len(test), math.nan)
        threshold = float(np.median(fit.risk_train)) if fit is not None else math.nan
        for i, r, s_h in zip(test, risk_test, at_horizon):
            risk_rows.append({"patient_id": cohort.ids[i], "fold": int(k), "model": name, "risk": float(r),
                              "time": float(cohort.time[i]), "event": int(cohort.event[i]),
                              "survival_at_horizon": float(s_h)})
            if fit is not None and np.isfinite(r):
                group_rows.append({"patient_id": cohort.ids[i], "model": name, "high": bool(r > threshold),
                                   "time": float(cohort.time[i]), "event": bool(cohort.event[i])})
    return CVResult(folds=pd.DataFrame(fold_rows, columns=FOLD_COLUMNS),
                    risks=pd.DataFrame(risk_rows, columns=RISK_COLUMNS),
                    groups=pd.DataFrame(group_rows, columns=["patient_id", "model", "high", "time", "event"]),
                    auc=pd.DataFrame(auc_rows, columns=AUC_COLUMNS))


def _centers_without_events(cohort: Cohort, test: np.ndarray) -> str:
    if cohort.center is None:
        return ""
    centers = cohort.center[test].astype(str)
    empty = sorted(c for c in np.unique(centers) if not cohort.event[test][centers == c].any())
    return f"center(s) {', '.join(empty)} without events in test fold" if empty else ""


def per_center_concordance(risks: pd.DataFrame, centers: pd.Series) -> pd.DataFrame:
    """Harrell's C of out-of-fold risks within each center (``centers`` indexed by patient_id).

    Risks of different folds come from different fitted models whose scales need not agree (an
    MLP's especially), so pairs are only compared within a fold: C per (fold, center), averaged
    over the folds where it is defined. A center without events (or without a comparable pair)
    gets NaN and a reason.
    """
    rows = []
    frame = risks.assign(center=risks["patient_id"].map(centers))
    if "fold" not in frame.columns:
        frame = frame.assign(fold=0)
    for (model, center), part in frame.groupby(["model", "center"], sort=True):
        row = {"model": model, "center": center, "n": len(part), "events": int(part["event"].sum()),
               "harrell_c": math.nan, "folds": 0, "note": ""}
        if row["events"] == 0:
            row["note"] = "no events in this center: concordance undefined"
            rows.append(row)
            continue
        values, problems = [], []
        for _, fold in part.groupby("fold", sort=True):
            if not fold["event"].any():
                continue
            try:
                values.append(float(concordance_index_censored(
                    fold["event"].astype(bool).to_numpy(), fold["time"].to_numpy(float),
                    fold["risk"].to_numpy(float))[0]))
            except (ValueError, ZeroDivisionError) as error:
                problems.append(str(error))
        if values:
            row["harrell_c"], row["folds"] = float(np.mean(values)), len(values)
        row["note"] = "; ".join(dict.fromkeys(problems)) if problems else ""
        if not values and not problems:
            row["note"] = "no fold with events and a comparable pair in this center"
        rows.append(row)
    return pd.DataFrame(rows, columns=["model", "center", "n", "events", "harrell_c", "folds", "note"])


def summarize(folds: pd.DataFrame, intervals: pd.DataFrame | None = None) -> pd.DataFrame:
    """Mean and sample standard deviation (ddof=1) over the folds where a metric is defined, and
    the bootstrap intervals (``intervals.bootstrap_intervals``, NaN where not given)."""
    rows = []
    by_model = intervals.set_index("model") if intervals is not None else None
    for model in dict.fromkeys(folds["model"]):
        part = folds[folds["model"] == model]
        row: dict[str, Any] = {"model": model}
        for metric in ("harrell_c", "uno_c", "ibs", "mean_auc"):
            values = part[metric].to_numpy(dtype=float)
            values = values[np.isfinite(values)]
            row[f"{metric}_mean"] = float(values.mean()) if values.size else math.nan
            row[f"{metric}_std"] = float(values.std(ddof=1)) if values.size > 1 else math.nan
        # Each mean covers only the folds where its metric is defined; say so per metric.
        undefined = {metric: int((~np.isfinite(part[metric].to_numpy(dtype=float))).sum())
                     for metric in ("harrell_c", "uno_c", "ibs")}
        row["note"] = "; ".join(f"{metric} undefined in {count} of {len(part)} folds"
                                for metric, count in undefined.items() if count)
        for column in SUMMARY_COLUMNS:
            if column.endswith(("_ci_low", "_ci_high")):
                known = by_model is not None and model in by_model.index
                row[column] = float(by_model.loc[model, column]) if known else math.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def km_curves(groups: pd.DataFrame) -> dict[str, Any]:
    """Kaplan-Meier curves of the low and high risk groups per model, and the log-rank p-value
    (NaN, written as null, when a group is empty or nobody has an event)."""
    out: dict[str, Any] = {}
    for model in dict.fromkeys(groups["model"]):
        part = groups[groups["model"] == model]
        entry: dict[str, Any] = {}
        for label, members in (("low", part[~part["high"]]), ("high", part[part["high"]])):
            if len(members):
                time, surv = kaplan_meier_estimator(members["event"].to_numpy(bool), members["time"].to_numpy(float))
                time, surv = np.concatenate([[0.0], time]), np.concatenate([[1.0], surv])
            else:
                time, surv = np.array([]), np.array([])
            entry[label] = {"time": [float(t) for t in time], "survival": [float(s) for s in surv]}
        p = math.nan
        if part["high"].nunique() == 2 and part["event"].any():
            y = Surv.from_arrays(event=part["event"].to_numpy(bool), time=part["time"].to_numpy(float))
            try:
                p = float(compare_survival(y, part["high"].to_numpy())[1])
            except ValueError:
                p = math.nan
        entry["logrank_p"] = p if math.isfinite(p) else None
        out[model] = entry
    return out
