"""Synthetic head-and-neck cohort: EHR covariates, tumour burden, and recurrence-free survival.

The hazard depends on the tumour volume visible in the images and on the EHR, so prognosis has signal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

# Exactly the columns the demo config's prognosis.ehr section names.
EHR_COLUMNS = ["patient_id", "rfs_months", "relapse", "age", "weight", "center", "tobacco", "alcohol",
               "performance_status", "gender", "hpv", "surgery", "chemotherapy"]
CODEBOOK = {
    "rfs_months": "recurrence-free survival time in months (event or censoring)",
    "relapse": "1 = recurrence or death observed at rfs_months, 0 = censored",
    "gender": "1 = male, 0 = female",
    "hpv": "1 = HPV positive, 0 = negative, empty = unknown",
    "surgery": "1 = primary surgery", "chemotherapy": "1 = concurrent chemotherapy",
    "tobacco": "never | former | current", "alcohol": "none | moderate | heavy",
    "performance_status": "ECOG 0-2",
}
# Log-hazard coefficients of the generating model (per unit of each term below).
HAZARD = {"log_volume": 0.9, "hpv": -0.9, "age_per_decade": 0.35, "performance_status": 0.45,
          "current_smoker": 0.35, "heavy_alcohol": 0.2, "surgery": -0.25}
WEIBULL_SHAPE = 1.2
WEIBULL_SCALE_MONTHS = 40.0
TARGET_CENSORED = 0.5
MISSING_RATES = {"hpv": 0.10, "tobacco": 0.08, "alcohol": 0.08, "weight": 0.04, "performance_status": 0.04}


@dataclass
class Patient:
    """EHR of one synthetic patient and the tumour volumes (mL) its images are drawn with."""

    patient_id: str
    center: str
    age: int
    weight: float
    gender: int
    tobacco: str
    alcohol: str
    performance_status: int
    hpv: int
    surgery: int
    chemotherapy: int
    primary_ml: float
    node_ml: list[float] = field(default_factory=list)


def draw_patient(patient_id: str, center: str, rng: np.random.Generator) -> Patient:
    """One patient's covariates and tumour burden (HPV+ disease: younger, fewer smokers, more nodes)."""
    hpv = int(rng.random() < 0.45)
    tobacco = str(rng.choice(["never", "former", "current"], p=[0.5, 0.3, 0.2] if hpv else [0.2, 0.35, 0.45]))
    gender = int(rng.random() < 0.8)
    age = int(np.clip(np.round(rng.normal(58.0 if hpv else 63.0, 9.0)), 35, 85))
    weight = float(np.round(rng.normal(80.0 if gender else 66.0, 13.0), 1))
    primary = float(np.clip(rng.lognormal(np.log(10.0), 0.7), 1.5, 60.0))
    n_nodes = int(rng.choice([0, 1, 2, 3], p=[0.15, 0.35, 0.3, 0.2] if hpv else [0.3, 0.35, 0.25, 0.1]))
    nodes = [float(np.clip(rng.lognormal(np.log(3.0), 0.6), 0.6, 20.0)) for _ in range(n_nodes)]
    return Patient(
        patient_id=patient_id, center=center, age=age, weight=max(weight, 40.0), gender=gender, tobacco=tobacco,
        alcohol=str(rng.choice(["none", "moderate", "heavy"], p=[0.35, 0.45, 0.2])),
        performance_status=int(rng.choice([0, 1, 2], p=[0.5, 0.38, 0.12])), hpv=hpv,
        surgery=int(rng.random() < 0.25), chemotherapy=int(rng.random() < (0.85 if primary > 8 else 0.6)),
        primary_ml=primary, node_ml=nodes,
    )


def linear_predictor(patients: list[Patient], log_volume: np.ndarray) -> np.ndarray:
    """Log relative hazard of each patient from the measured log tumour volume and the EHR."""
    centred = log_volume - log_volume.mean()
    return np.array([
        HAZARD["log_volume"] * v + HAZARD["hpv"] * p.hpv + HAZARD["age_per_decade"] * (p.age - 60) / 10.0
        + HAZARD["performance_status"] * p.performance_status + HAZARD["current_smoker"] * (p.tobacco == "current")
        + HAZARD["heavy_alcohol"] * (p.alcohol == "heavy") + HAZARD["surgery"] * p.surgery
        for p, v in zip(patients, centred)
    ])


def draw_outcomes(patients: list[Patient], log_volume: np.ndarray, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Weibull proportional-hazards event times, uniformly censored so that about half are censored."""
    risk = np.exp(linear_predictor(patients, log_volume))
    event_time = WEIBULL_SCALE_MONTHS * (rng.exponential(size=len(patients)) / risk) ** (1.0 / WEIBULL_SHAPE)
    unit = rng.random(len(patients))
    low, high = 1.0, 1000.0
    # The censoring horizon is tuned on this cohort so the censored share is near the target.
    for _ in range(60):
        horizon = np.sqrt(low * high)
        censored = np.mean(unit * horizon < event_time)
        low, high = (horizon, high) if censored > TARGET_CENSORED else (low, horizon)
    censor_time = unit * np.sqrt(low * high)
    time = np.maximum(np.round(np.minimum(event_time, censor_time), 1), 0.5)
    event = (event_time <= censor_time).astype(int)
    return time, event


def clinical_table(patients: list[Patient], time: np.ndarray, event: np.ndarray, rng: np.random.Generator
                   ) -> pd.DataFrame:
    """The EHR table (columns ``EHR_COLUMNS``) with a few covariate values missing at random."""
    frame = pd.DataFrame({
        "patient_id": [p.patient_id for p in patients], "rfs_months": time, "relapse": event,
        "age": [p.age for p in patients], "weight": [p.weight for p in patients],
        "center": [p.center for p in patients], "tobacco": [p.tobacco for p in patients],
        "alcohol": [p.alcohol for p in patients],
        "performance_status": pd.array([p.performance_status for p in patients], dtype="Int64"),
        "gender": [p.gender for p in patients], "hpv": pd.array([p.hpv for p in patients], dtype="Int64"),
        "surgery": [p.surgery for p in patients], "chemotherapy": [p.chemotherapy for p in patients],
    })
    frame["tobacco"] = frame["tobacco"].astype(object)
    frame["alcohol"] = frame["alcohol"].astype(object)
    for column, rate in MISSING_RATES.items():
        count = max(1, int(round(rate * len(frame))))
        rows = rng.choice(len(frame), size=min(count, len(frame) - 1), replace=False)
        frame.loc[frame.index[np.sort(rows)], column] = pd.NA if column in ("hpv", "performance_status") else np.nan
    return frame[EHR_COLUMNS]
