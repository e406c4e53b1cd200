"""Finds and reads the metrics every stage left under the results folder, for the report.

A missing file means the stage did not run (None); a file that exists but is malformed is an error.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from duplus.errors import DataError
from duplus.results_layout import ResultsLayout
from duplus.settings import Settings

_TEXT_COLUMNS = {"dataset": str, "case": str, "center": str, "class": str, "model": str, "note": str}


@dataclass
class ReportInputs:
    """Everything the report reads; None (or empty) where a stage left nothing."""

    results_dir: Path
    train_log: pd.DataFrame | None = None
    summary: pd.DataFrame | None = None
    baseline_summary: pd.DataFrame | None = None
    per_case: pd.DataFrame | None = None
    efficiency: dict[str, Any] | None = None
    examples: dict[str, Path] = field(default_factory=dict)
    lora: dict[str, dict[str, Any]] = field(default_factory=dict)
    prognosis_summary: pd.DataFrame | None = None
    prognosis_folds: pd.DataFrame | None = None
    km: dict[str, Any] | None = None
    prognosis_auc: pd.DataFrame | None = None          # time-dependent AUC per model, fold and horizon
    calibration: dict[str, Any] | None = None           # {"horizon": h, "models": {model: curves}}
    prognosis_cohort: dict[str, Any] | None = None      # cohort.json: split, horizons, warnings
    files: list[Path] = field(default_factory=list)


def read_csv(path: Path, required: list[str]) -> pd.DataFrame:
    """Read a metrics CSV, checking that the ``required`` columns are there."""
    try:
        frame = pd.read_csv(path, dtype={k: v for k, v in _TEXT_COLUMNS.items()}, keep_default_na=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot be read as CSV ({error})") from error
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; expected at least {required}")
    return frame


def read_json(path: Path) -> Any:
    """Read a metrics JSON file (NaN allowed, as Python's json writes it)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not valid JSON ({error})") from error


def _optional_csv(inputs: ReportInputs, path: Path, required: list[str]) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    inputs.files.append(path)
    return read_csv(path, required)


def _optional_json(inputs: ReportInputs, path: Path) -> Any:
    if not path.is_file():
        return None
    inputs.files.append(path)
    return read_json(path)


def load_inputs(results_dir: str | Path, config: Mapping[str, Any] | None = None) -> ReportInputs:
    """Read every stage's metrics under ``results_dir`` (missing stages stay None).

    With ``config``, only what this run produces: a stage switched off, or a LoRA center no longer
    configured, may have left results of an earlier run in the folder, and they must not be shown
    as this run's.
    """
    inputs = _load_all(results_dir)
    if config is None:
        return inputs
    layout = ResultsLayout(inputs.results_dir)
    dropped: list[Path] = []  # neither shown nor listed in the provenance
    settings = Settings.of(config)
    if not settings.baseline.enabled:
        inputs.baseline_summary = None
        dropped.append(layout.baseline_evaluation("summary.csv"))
    if not settings.prognosis.enabled:
        inputs.prognosis_summary, inputs.prognosis_folds, inputs.km = None, None, None
        inputs.prognosis_auc, inputs.calibration, inputs.prognosis_cohort = None, None, None
        dropped += [p for p in inputs.files if p.is_relative_to(layout.prognosis())]
    if "lora" in config:
        centers = set(settings.lora.centers) if settings.lora.enabled else set()
        dropped += [layout.lora_center(name) / "metrics.json" for name in inputs.lora if name not in centers]
        inputs.lora = {name: metrics for name, metrics in inputs.lora.items() if name in centers}
    inputs.files = [p for p in inputs.files if p not in dropped]
    return inputs


def _load_all(results_dir: str | Path) -> ReportInputs:
    inputs = ReportInputs(results_dir=Path(results_dir))
    layout = ResultsLayout(inputs.results_dir)
    universal, prognosis = layout.universal_evaluation, layout.prognosis
    inputs.train_log = _optional_csv(inputs, layout.train_log, ["step", "loss", "lr", "seconds"])
    seg_columns = ["dataset", "class", "dice", "hd95", "nsd", "n"]
    inputs.summary = _optional_csv(inputs, universal("summary.csv"), seg_columns)
    inputs.baseline_summary = _optional_csv(inputs, layout.baseline_evaluation("summary.csv"), seg_columns)
    inputs.per_case = _optional_csv(inputs, universal("per_case.csv"), ["dataset", "case", "class", "dice"])
    efficiency = _optional_json(inputs, universal("efficiency.json"))
    if efficiency is not None and not isinstance(efficiency, dict):
        raise DataError(f"{universal('efficiency.json')}: expected a JSON object")
    inputs.efficiency = efficiency
    examples = universal("examples")
    if examples.is_dir():
        inputs.examples = {p.stem: p for p in sorted(examples.glob("*.npz"))}
        inputs.files += list(inputs.examples.values())
    inputs.lora = _load_lora(inputs)
    inputs.prognosis_summary = _optional_csv(
        inputs, prognosis("summary.csv"),
        ["model", "harrell_c_mean", "harrell_c_std", "uno_c_mean", "uno_c_std", "ibs_mean", "ibs_std"])
    if inputs.prognosis_summary is not None and set(inputs.prognosis_summary["model"].astype(str)) <= {"none"}:
        inputs.prognosis_summary = None  # the stage ran switched off: no measured row to show
    inputs.prognosis_folds = _optional_csv(inputs, prognosis("folds.csv"), ["model", "fold", "harrell_c"])
    km = _optional_json(inputs, prognosis("km.json"))
    if km is not None and not isinstance(km, dict):
        raise DataError(f"{prognosis('km.json')}: expected a JSON object {{model: curves}}")
    inputs.km = km
    # Files added after the first release of the stage: an older results folder lacks them.
    inputs.prognosis_auc = _optional_csv(inputs, prognosis("auc.csv"), ["model", "fold", "horizon", "auc"])
    for name in ("calibration", "cohort"):
        value = _optional_json(inputs, prognosis(f"{name}.json"))
        if value is not None and not isinstance(value, dict):
            raise DataError(f"{prognosis(name + '.json')}: expected a JSON object")
        setattr(inputs, "calibration" if name == "calibration" else "prognosis_cohort", value)
    return inputs


def _load_lora(inputs: ReportInputs) -> dict[str, dict[str, Any]]:
    root = ResultsLayout(inputs.results_dir).lora
    if not root.is_dir():
        return {}
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(root.glob("*/metrics.json")):
        inputs.files.append(path)
        metrics = read_json(path)
        if not isinstance(metrics, dict):
            raise DataError(f"{path}: expected a JSON object of adaptation metrics")
        # The folder name is the config's adapter key (unique); "center" may repeat across datasets.
        found[path.parent.name] = metrics
    return found


def number(value: Any) -> float:
    """A metrics value as float; NaN for missing or non-numeric (a center with no data, say)."""
    try:
        result = float(value)
    except (TypeError, ValueError):
        return math.nan
    return result
