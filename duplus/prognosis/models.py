"""The survival models compared in cross-validation and their inputs, fitted on one training fold:
ehr_coxph, ehr_rsf, ehr_mlp, ehr_text, ehr_tabular_text (EHR only), image_mlp, image_ehr_tabular,
image_ehr_text (concatenated) and image_ehr_text_film (the text conditions the image features), MLP_Prog.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sksurv.util import Surv

from duplus.prognosis.ehr import EHRSchema
from duplus.prognosis.ehr_preprocessor import EHRPreprocessor
from duplus.prognosis.heads import MLPSettings, SurvivalMLP
from duplus.prognosis.text import TextFeatures
from duplus.settings import Settings, schema_default

# model name -> (learner, input blocks)
MODEL_INPUTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "ehr_coxph": ("coxph", ("ehr",)),
    "ehr_rsf": ("rsf", ("ehr",)),
    "ehr_mlp": ("mlp", ("ehr",)),
    "image_mlp": ("mlp", ("image",)),
    "image_ehr_tabular": ("mlp", ("image", "ehr")),
    "image_ehr_text": ("mlp", ("image", "text")),
    # FiLM: the last block conditions the first (MLPProg's condition_dim).
    "image_ehr_text_film": ("film", ("image", "text")),
    "ehr_text": ("mlp", ("text",)),
    "ehr_tabular_text": ("mlp", ("ehr", "text")),
}
MERGE_MODELS = {"tabular": "image_ehr_tabular", "text": "image_ehr_text", "text_film": "image_ehr_text_film"}
# The EHR routes through the text encoder, run whenever the cohort has text inputs.
EHR_TEXT_MODELS = ("ehr_text", "ehr_tabular_text")
# Wide blocks (bottleneck features, sentence embeddings) are reduced with a PCA fitted on the
# training fold: a cohort of tens to hundreds of patients cannot support hundreds of inputs.
MAX_BLOCK_DIM = 16
# Image columns reduced by that PCA; any other named column (the log tumour volume, a known
# prognostic factor) is passed through so that it cannot be lost among the components. A column of
# one of several scans is named after its dataset first (``hecktor2022_ct/gap_0``).
REDUCED_PREFIXES = ("gap_", "tumour_")


@dataclass
class Cohort:
    """Patients with outcome and model inputs, all arrays aligned by row.

    ehr: validated EHR rows (``EHRTable.frame``) with its schema; image: features (N, F) with
    optional column names (``features.feature_names``); text: the EHR through the text encoder
    (``text.TextFeatures``); center: used to stratify folds and report centers without events.
    """

    ids: np.ndarray
    time: np.ndarray
    event: np.ndarray
    ehr: pd.DataFrame | None = None
    schema: EHRSchema | None = None
    image: np.ndarray | None = None
    text: TextFeatures | None = None
    center: np.ndarray | None = None
    image_names: list[str] | None = None

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids).astype(str)
        self.time = np.asarray(self.time, dtype=float)
        self.event = np.asarray(self.event).astype(bool)
        n = len(self.ids)
        for name in ("time", "event", "ehr", "image", "text", "center"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"cohort: {name} has {len(value)} rows, ids have {n}")
        if self.ehr is not None:
            self.ehr = self.ehr.reset_index(drop=True)
            if self.schema is None:
                raise ValueError("cohort: an EHR frame needs its schema")
        if self.image_names is not None and (self.image is None or len(self.image_names) != self.image.shape[1]):
            raise ValueError("cohort: image_names must name every image column")

    def __len__(self) -> int:
        return len(self.ids)

    def y(self, index: np.ndarray | slice = slice(None)) -> np.ndarray:
        return Surv.from_arrays(event=self.event[index], time=self.time[index])

    def has(self, block: str) -> bool:
        return getattr(self, block) is not None


@dataclass(frozen=True)
class ModelSettings:
    """Hyper-parameters of the compared models (the MLP ones come from config ``prognosis``)."""

    mlp: MLPSettings = field(default_factory=MLPSettings)
    # The config's prognosis.baselines set these (defaults chosen by bench/prognosis_baselines.py); the
    # schema's defaults serve callers without a config (tests, benchmarks).
    # Cox: a ridge, as one-hot levels are collinear under the partial likelihood.
    cox_alpha: float = float(schema_default("prognosis", "baselines", "cox_alpha"))
    rsf_trees: int = schema_default("prognosis", "baselines", "rsf_trees")
    rsf_min_leaf: int = schema_default("prognosis", "baselines", "rsf_min_leaf")
    seed: int = 0

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "ModelSettings":
        """MLP settings from ``prognosis``, the baselines' from ``prognosis.baselines`` (defaults in the schema)."""
        settings = Settings.of(config)
        baselines = settings.prognosis.baselines
        return cls(mlp=MLPSettings.from_config(settings), seed=settings.seed, cox_alpha=baselines.cox_alpha,
                   rsf_trees=baselines.rsf_trees, rsf_min_leaf=baselines.rsf_min_leaf)


@dataclass
class FoldFit:
    """One model's predictions on one fold."""

    risk_train: np.ndarray
    risk_test: np.ndarray
    survival: Callable[[np.ndarray], np.ndarray]     # times -> S(t | x_test), (n_test, len(times))


def model_names(config: Mapping[str, Any], cohort: Cohort) -> list[str]:
    """The models to compare: the EHR baselines, image_mlp, and one per config ``prognosis.merge``."""
    names = ["ehr_coxph", "ehr_rsf", "ehr_mlp"] if cohort.has("ehr") else []
    if cohort.has("ehr") and cohort.has("text"):
        names.extend(EHR_TEXT_MODELS)
    if cohort.has("image"):
        names.append("image_mlp")
        for merge in Settings.of(config).prognosis.merge:
            name = MERGE_MODELS[merge]
            if all(cohort.has(b) for b in MODEL_INPUTS[name][1]):
                names.append(name)
    return names


def build_inputs(cohort: Cohort, blocks: tuple[str, ...], train: np.ndarray,
                 test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Design matrices for the training and test rows; every statistic comes from ``train``."""
    parts_train, parts_test = block_inputs(cohort, blocks, train, test)
    return np.concatenate(parts_train, axis=1), np.concatenate(parts_test, axis=1)


def block_inputs(cohort: Cohort, blocks: tuple[str, ...], train: np.ndarray,
                 test: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``build_inputs`` block by block: one (train, test) matrix pair per block, in order."""
    parts_train, parts_test = [], []
    for block in blocks:
        if not cohort.has(block):
            raise ValueError(f"cohort has no '{block}' input")
        if block == "ehr":
            prep = EHRPreprocessor(cohort.schema).fit(cohort.ehr.iloc[train])
            parts_train.append(prep.transform(cohort.ehr.iloc[train]))
            parts_test.append(prep.transform(cohort.ehr.iloc[test]))
            continue
        if block == "text":
            a, b = cohort.text.design(train, test)
            parts_train.append(a)
            parts_test.append(b)
            continue
        values = np.asarray(getattr(cohort, block), dtype=np.float64)
        a, b = values[train], values[test]
        mean, std = a.mean(axis=0), a.std(axis=0)
        std = np.where(std > 1e-8, std, 1.0)
        a, b = (a - mean) / std, (b - mean) / std
        reduce = np.ones(a.shape[1], dtype=bool)
        if block == "image" and cohort.image_names is not None:
            reduce = np.array([name.rsplit("/", 1)[-1].startswith(REDUCED_PREFIXES) for name in cohort.image_names])
        k = min(MAX_BLOCK_DIM, len(train) - 1)
        if reduce.sum() > MAX_BLOCK_DIM and k >= 1:
            pca = PCA(n_components=k, random_state=0).fit(a[:, reduce])
            a = np.concatenate([pca.transform(a[:, reduce]), a[:, ~reduce]], axis=1)
            b = np.concatenate([pca.transform(b[:, reduce]), b[:, ~reduce]], axis=1)
        parts_train.append(a)
        parts_test.append(b)
    return parts_train, parts_test


def fit_predict(name: str, cohort: Cohort, train: np.ndarray, test: np.ndarray,
                settings: ModelSettings, fold: int = 0) -> FoldFit:
    """Fit model ``name`` on the ``train`` rows and predict the ``test`` rows."""
    if name not in MODEL_INPUTS:
        raise ValueError(f"unknown prognosis model '{name}'; known: {sorted(MODEL_INPUTS)}")
    learner, blocks = MODEL_INPUTS[name]
    parts_train, parts_test = block_inputs(cohort, blocks, train, test)
    X_train, X_test = np.concatenate(parts_train, axis=1), np.concatenate(parts_test, axis=1)
    time, event = cohort.time[train], cohort.event[train]
    if learner in ("mlp", "film"):
        # FiLM: the inputs of the last block condition those before it.
        condition_dim = parts_train[-1].shape[1] if learner == "film" else 0
        mlp = SurvivalMLP(replace(settings.mlp, seed=settings.mlp.seed + fold),
                          condition_dim=condition_dim).fit(X_train, time, event)
        return FoldFit(mlp.predict_risk(X_train), mlp.predict_risk(X_test),
                       lambda times: mlp.predict_survival(X_test, times))
    if learner == "coxph":
        from sksurv.linear_model import CoxPHSurvivalAnalysis

        estimator = CoxPHSurvivalAnalysis(alpha=settings.cox_alpha, ties="efron", n_iter=200)
    else:
        from sksurv.ensemble import RandomSurvivalForest

        estimator = RandomSurvivalForest(n_estimators=settings.rsf_trees, min_samples_leaf=settings.rsf_min_leaf,
                                         max_features="sqrt", random_state=settings.seed + fold, n_jobs=1)
    with warnings.catch_warnings():
        # Separable folds make Newton steps diverge slowly; the ridge keeps the fit finite.
        warnings.filterwarnings("ignore", message=".*converge.*")
        warnings.filterwarnings("ignore", message=".*overflow.*")
        estimator.fit(X_train, Surv.from_arrays(event=event, time=time))
    return FoldFit(np.asarray(estimator.predict(X_train), dtype=float),
                   np.asarray(estimator.predict(X_test), dtype=float),
                   lambda times: _step_functions(estimator, X_test, times))


def _step_functions(estimator: Any, X: np.ndarray, times: np.ndarray) -> np.ndarray:
    functions = estimator.predict_survival_function(X)
    # A step function is defined on the training times only; beyond them it is flat.
    return np.stack([fn(np.clip(times, fn.domain[0], fn.domain[1])) for fn in functions])
