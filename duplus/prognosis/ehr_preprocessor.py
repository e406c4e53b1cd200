"""EHR table -> model matrix fitted on the training fold only: median / most-frequent imputation,
missing indicators, z-scored numerics, one-hot categoricals, 0/1 binaries (sklearn-style).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin

from duplus.errors import EHRError
from duplus.prognosis.ehr import EHRSchema


@dataclass
class _Fitted:
    medians: dict[str, float] = field(default_factory=dict)
    means: dict[str, float] = field(default_factory=dict)
    stds: dict[str, float] = field(default_factory=dict)
    modes: dict[str, object] = field(default_factory=dict)
    levels: dict[str, list[str]] = field(default_factory=dict)
    indicators: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    constant: np.ndarray | None = None     # output columns that do not vary over the training rows


class EHRPreprocessor(TransformerMixin, BaseEstimator):
    """Turn validated EHR rows (``EHRTable.frame``) into a float32 matrix.

    Statistics (medians, means, standard deviations, most frequent values, category levels, which
    columns get a missing indicator) come from ``fit`` only: ``transform`` of a row depends on that
    row and the fitted state, never on the other rows it is passed with. A category first seen at
    ``transform`` gets all-zero one-hot columns.

    An output column that does not vary over the training rows (a covariate constant or entirely
    missing there, a category with a single level, an always-set missing indicator) is 0 for every
    row: the model never saw it vary, so its weights on it are untrained, and a test value that
    differs would be multiplied by them.

    Example:
        >>> prep = EHRPreprocessor(schema).fit(table.frame.iloc[train])
        >>> X_test = prep.transform(table.frame.iloc[test])
    """

    def __init__(self, schema: EHRSchema) -> None:
        self.schema = schema

    def fit(self, frame: pd.DataFrame, y: object = None) -> "EHRPreprocessor":
        if len(frame) == 0:
            raise EHRError("EHR preprocessing: cannot fit on an empty training fold")
        self._check_columns(frame)
        fitted = _Fitted()
        for column in self.schema.numeric:
            values = frame[column].to_numpy(dtype=float)
            observed = values[~np.isnan(values)]
            # A column with no observed training value carries no information: constant 0.
            median = float(np.median(observed)) if observed.size else 0.0
            imputed = np.where(np.isnan(values), median, values)
            std = float(imputed.std())
            fitted.medians[column] = median
            fitted.means[column] = float(imputed.mean())
            fitted.stds[column] = std if std > 1e-12 else 1.0
            fitted.names.append(column)
        for column in self.schema.categorical:
            present = frame[column].dropna().astype(str)
            counts = present.value_counts()
            # Ties between equally frequent levels are broken by sorted name: deterministic.
            fitted.modes[column] = (sorted(counts[counts == counts.max()].index)[0] if len(counts) else None)
            fitted.levels[column] = sorted(counts.index)
            fitted.names.extend(f"{column}={level}" for level in fitted.levels[column])
        for column in self.schema.binary:
            values = frame[column].to_numpy(dtype=float)
            observed = values[~np.isnan(values)]
            fitted.modes[column] = float(observed.mean() > 0.5) if observed.size else 0.0
            fitted.names.append(column)
        for column in self.schema.covariates:
            if frame[column].isna().any():
                fitted.indicators.append(column)
                fitted.names.append(f"{column}_missing")
        # Decided on the encoded training rows, so one rule covers numerics, levels and indicators.
        fitted.constant = np.ptp(self._encode(frame, fitted), axis=0) <= 1e-12
        self.fitted_ = fitted
        self.n_features_in_ = len(self.schema.covariates)
        return self

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        fitted: _Fitted = getattr(self, "fitted_", None)
        if fitted is None:
            raise EHRError("EHR preprocessing: transform called before fit (fit on the training fold)")
        self._check_columns(frame)
        matrix = self._encode(frame, fitted)
        matrix[:, fitted.constant] = 0.0
        return matrix

    def _encode(self, frame: pd.DataFrame, fitted: _Fitted) -> np.ndarray:
        blocks: list[np.ndarray] = []
        for column in self.schema.numeric:
            values = frame[column].to_numpy(dtype=float)
            values = np.where(np.isnan(values), fitted.medians[column], values)
            blocks.append(((values - fitted.means[column]) / fitted.stds[column])[:, None])
        for column in self.schema.categorical:
            values = frame[column].astype(object).where(frame[column].notna(), fitted.modes[column])
            values = values.map(lambda v: None if v is None else str(v)).to_numpy()
            levels = fitted.levels[column]
            blocks.append(np.stack([values == level for level in levels], axis=1).astype(float)
                          if levels else np.zeros((len(frame), 0)))
        for column in self.schema.binary:
            values = frame[column].to_numpy(dtype=float)
            blocks.append(np.where(np.isnan(values), fitted.modes[column], values)[:, None])
        for column in fitted.indicators:
            blocks.append(frame[column].isna().to_numpy(dtype=float)[:, None])
        if not blocks:
            return np.zeros((len(frame), 0), dtype=np.float32)
        return np.concatenate(blocks, axis=1).astype(np.float32)

    def get_feature_names_out(self, input_features: object = None) -> np.ndarray:
        return np.asarray(self.fitted_.names, dtype=object)

    def _check_columns(self, frame: pd.DataFrame) -> None:
        missing = [c for c in self.schema.covariates if c not in frame.columns]
        if missing:
            raise EHRError(f"EHR preprocessing: the rows lack column(s) {missing}")
