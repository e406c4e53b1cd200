"""Builds the paper-style tables (segmentation, adaptation, prognosis, efficiency) from metrics.

Measured values and published reference values sit in separate, marked columns or rows.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import numpy as np
import pandas as pd

from duplus.evaluate.definitions import DEFAULT_NSD_TOLERANCE_MM, definitions_note
from duplus.report import published as pub
from duplus.report.inputs import number
from duplus.report.tabular import Column, Table, fmt, fmt_mean_std
from duplus.settings import schema_default

MIB = float(2**20)

# Prognosis models in the order the paper's ablation reads: EHR only, image only, then both.
PROGNOSIS_MODELS: dict[str, str] = {
    "ehr_coxph": "EHR: Cox proportional hazards",
    "ehr_rsf": "EHR: random survival forest",
    "ehr_mlp": "EHR: neural survival head",
    "ehr_text": "EHR as text (one sentence per field) through the text encoder",
    "ehr_tabular_text": "EHR as a table + as text",
    "image_mlp": "Image features: neural survival head",
    "image_ehr_tabular": "Image + EHR as a table",
    "image_ehr_text": "Image + EHR as text prompt",
    "image_ehr_text_film": "Image features conditioned on EHR text (FiLM)",
}

# prognosis.endpoint's default (what the demo cohort and HECKTOR measure), for callers without a config.
DEFAULT_ENDPOINT = schema_default("prognosis", "endpoint")

# Legend of the per-class tables, as Table 1 has in its rounding note.
DASH_NOTE = "A dash is a value that could not be computed."

PUBLISHED_NOTE = "Columns or rows marked published are values reported in the literature, not measured here."


def safe_name(text: str) -> str:
    """A file-name-safe stem for a dataset or center name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "unnamed"


def _dataset_means(summary: pd.DataFrame) -> pd.DataFrame:
    means = summary[summary["class"].str.lower() == "mean"]
    return means.drop_duplicates("dataset", keep="last").set_index("dataset")


def _seg_cells(row: pd.Series | None, prefix: str = "") -> dict[str, str | None]:
    if row is None:
        return {f"{prefix}dice": None, f"{prefix}hd95": None, f"{prefix}nsd": None}
    return {
        f"{prefix}dice": fmt(row["dice"], "score"),
        f"{prefix}hd95": fmt(row["hd95"], "hd95"),
        f"{prefix}nsd": fmt(row["nsd"], "score"),
    }


def _seg_columns(prefix: str = "", label: str = "") -> list[Column]:
    return [
        Column(f"{prefix}dice", f"{label}Dice"),
        Column(f"{prefix}hd95", f"{label}HD95 (mm)"),
        Column(f"{prefix}nsd", f"{label}NSD"),
    ]


def segmentation_table(summary: pd.DataFrame, baseline: pd.DataFrame | None = None,
                       published: bool = True, nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM) -> Table:
    """Table 1: mean Dice / HD95 / NSD per dataset, a task-specific baseline and published Dice;
    ``nsd_tolerance_mm`` (config ``evaluate.nsd_tolerance_mm``) is named with the definitions."""
    means = _dataset_means(summary)
    base_means = _dataset_means(baseline) if baseline is not None else None
    columns = [Column("dataset", "dataset", numeric=False), Column("classes", "classes"), Column("cases", "cases")]
    columns += _seg_columns()
    if base_means is not None:
        columns += _seg_columns("base_", "baseline ")
    if published:
        columns.append(Column("benchmark", "benchmark", numeric=False, published=True))
        columns += [Column(f"pub_{m}", f"{m} Dice", published=True) for m in pub.SEGMENTATION_MODELS]
    rows: list[dict[str, str | None]] = []
    datasets = list(dict.fromkeys(summary["dataset"]))
    for dataset in datasets:
        classes = summary[(summary["dataset"] == dataset) & (summary["class"].str.lower() != "mean")]
        row: dict[str, str | None] = {"dataset": dataset, "classes": str(len(classes))}
        mean = means.loc[dataset] if dataset in means.index else None
        row["cases"] = fmt(mean["n"], "int") if mean is not None else None
        row.update(_seg_cells(mean))
        if base_means is not None:
            row.update(_seg_cells(base_means.loc[dataset] if dataset in base_means.index else None, "base_"))
        if published:
            values = pub.published_dice(dataset)
            row["benchmark"] = pub.benchmark_for(dataset)
            for model in pub.SEGMENTATION_MODELS:
                row[f"pub_{model}"] = values[model].text() if model in values else None
        rows.append(row)
    if len(means) > 1:
        rows.extend(_overall_rows(means, base_means))
    notes = [
        "Dice, HD95 and NSD per dataset are the means over its classes of the means over its test cases, "
        "in the original image space.",
        definitions_note(nsd_tolerance_mm),
        "Rounding: Dice / NSD 3 decimals, HD95 1 decimal; a dash is a value that could not be computed.",
    ]
    if base_means is not None:
        notes.append("Baseline columns: a task-specific model (the same backbone, no prompts, a fixed head) trained "
                     "and evaluated on each dataset alone, by default on an equal share of the universal training steps.")
    if published:
        notes.append(PUBLISHED_NOTE)
        notes.append(f"Published Dice: {pub.NNUNET_REVISITED}, on the named benchmark (published in percent, "
                     "shown as a fraction at its published precision). Datasets without a published "
                     "counterpart (e.g. the synthetic demo) have none.")
        shown = [v for d in datasets for v in pub.published_dice(d).values()]
        notes.extend(pub.definition_notes(shown))
        if any(pub.benchmark_for(d) == "KiTS23" and d.lower() != "kits23" for d in datasets):
            notes.append("KiTS19 / KiTS21 are compared with the KiTS23 number, the closest published one "
                         "(KiTS23 has more cases and a cyst class).")
    return Table("table1_segmentation", "Table 1. Universal segmentation per dataset", columns, rows, notes)


def _overall_rows(means: pd.DataFrame, base_means: pd.DataFrame | None) -> list[dict[str, str | None]]:
    """The mean over all datasets; where the baseline covers fewer, a second row compares the two
    models over the datasets both were evaluated on (a mean over different sets compares nothing)."""
    if base_means is None:
        return [_overall_row(means, None, "all datasets (mean)")]
    shared = [d for d in means.index if d in base_means.index]
    if len(shared) == len(means):
        return [_overall_row(means, base_means, "all datasets (mean)")]
    rows = [_overall_row(means, None, "all datasets (mean)")]
    if shared:
        rows.append(_overall_row(means.loc[shared], base_means.loc[shared],
                                 f"datasets with a baseline ({len(shared)}, mean)"))
    return rows


def _overall_row(means: pd.DataFrame, base_means: pd.DataFrame | None, label: str) -> dict[str, str | None]:
    def mean_of(frame: pd.DataFrame, key: str) -> float:
        values = frame[key].astype(float).to_numpy()
        values = values[~np.isnan(values)]
        return float(values.mean()) if values.size else math.nan

    row: dict[str, str | None] = {"dataset": label, "classes": None, "cases": None}
    row.update({"dice": fmt(mean_of(means, "dice"), "score"), "hd95": fmt(mean_of(means, "hd95"), "hd95"),
                "nsd": fmt(mean_of(means, "nsd"), "score")})
    if base_means is not None:
        row.update({"base_dice": fmt(mean_of(base_means, "dice"), "score"),
                    "base_hd95": fmt(mean_of(base_means, "hd95"), "hd95"),
                    "base_nsd": fmt(mean_of(base_means, "nsd"), "score")})
    return row


def per_class_tables(summary: pd.DataFrame, baseline: pd.DataFrame | None = None,
                     nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM) -> list[Table]:
    """One table per dataset: Dice / HD95 / NSD per class (and the baseline's, where it has them)."""
    tables = []
    for dataset in dict.fromkeys(summary["dataset"]):
        own = summary[summary["dataset"] == dataset]
        base = baseline[baseline["dataset"] == dataset] if baseline is not None else None
        has_base = base is not None and len(base) > 0
        columns = [Column("class", "class", numeric=False), Column("n", "cases")] + _seg_columns()
        columns.insert(4, Column("hd95_n", "HD95 cases"))
        if has_base:
            columns += _seg_columns("base_", "baseline ")
        base_by_class = base.drop_duplicates("class", keep="last").set_index("class") if has_base else None
        # Per-class rows first, the dataset mean last, as in the paper's tables.
        ordered = pd.concat([own[own["class"].str.lower() != "mean"], own[own["class"].str.lower() == "mean"]])
        rows = []
        for _, record in ordered.iterrows():
            row: dict[str, str | None] = {"class": str(record["class"]), "n": fmt(record["n"], "int"),
                                          "hd95_n": fmt(record.get("hd95_n"), "int")}
            row.update(_seg_cells(record))
            if base_by_class is not None:
                name = record["class"]
                row.update(_seg_cells(base_by_class.loc[name] if name in base_by_class.index else None, "base_"))
            rows.append(row)
        tables.append(Table(f"table1_per_class_{safe_name(dataset)}", f"Table 1 ({dataset}). Per-class segmentation",
                            columns, rows, ["cases: test cases evaluated (a case without the class scores Dice 1 and HD95 0 when "
                             "the model finds none). HD95 in mm, over the HD95 cases only: where prediction or truth "
                             "is empty there is no distance, so a structure the model misses drops out of the HD95 "
                             "mean (compare HD95 cases with cases). On the mean row, HD95 cases counts the classes "
                             "the HD95 mean covers.", definitions_note(nsd_tolerance_mm), DASH_NOTE]))
    return tables


ADAPTATION_COLUMNS = [
    Column("adapter", "adapter", numeric=False),
    Column("dataset", "dataset", numeric=False),
    Column("center", "center", numeric=False),
    Column("zero_shot", "zero-shot Dice"),
    Column("lora", "LoRA Dice"),
    Column("full", "full FT Dice"),
    Column("gap", "gap closed"),
    Column("params_lora", "LoRA trainable params"),
    Column("params_full", "full FT trainable params"),
    Column("share", "LoRA share (%)"),
    Column("adapter_mb", "adapter (MB)"),
    Column("checkpoint_mb", "checkpoint (MB)"),
    Column("s_lora", "LoRA time (s)"),
    Column("s_full", "full FT time (s)"),
    Column("mem_lora", "LoRA peak memory (MB)"),
    Column("mem_full", "full FT peak memory (MB)"),
]


def adaptation_table(lora: dict[str, dict[str, Any]]) -> Table:
    """Table 2: per adapted center, zero-shot vs LoRA vs full fine-tuning and what each costs."""
    rows = []
    for key in sorted(lora):
        m = lora[key]
        total = number(m.get("total_params"))
        # The manifest's center (metrics' "site"); "center" there is the adapter's name.
        center = m.get("site", m.get("center"))
        trainable = number(m.get("trainable_params_lora"))
        rows.append({
            "adapter": key,
            "dataset": str(m["dataset"]) if m.get("dataset") is not None else None,
            "center": str(center) if center is not None else None,
            "zero_shot": fmt(m.get("zero_shot_dice"), "score"),
            "lora": fmt(m.get("lora_dice"), "score"),
            "full": fmt(m.get("full_ft_dice"), "score"),
            "gap": fmt(m.get("gap_closed"), "score"),
            "params_lora": fmt(m.get("trainable_params_lora"), "int"),
            "params_full": fmt(m.get("trainable_params_full"), "int"),
            "share": fmt(100.0 * trainable / total if total and total > 0 else math.nan, "percent"),
            "adapter_mb": fmt(number(m.get("adapter_bytes")) / MIB, "size_mb"),
            "checkpoint_mb": fmt(number(m.get("checkpoint_bytes")) / MIB, "size_mb"),
            "s_lora": fmt(m.get("seconds_lora"), "seconds"),
            "s_full": fmt(m.get("seconds_full"), "seconds"),
            # Each training's own peak: GPU memory on a GPU, resident memory on a CPU (see the note).
            "mem_lora": fmt(m.get("peak_cuda_mb_lora", m.get("peak_rss_mb_lora")), "mb"),
            "mem_full": fmt(m.get("peak_cuda_mb_full", m.get("peak_rss_mb_full")), "mb"),
        })
    notes = [
        "Dice is the mean over the center's test cases and classes. Gap closed = (LoRA - zero-shot) / "
        "(full FT - zero-shot): the share of full fine-tuning's gain that LoRA recovers.",
        "LoRA share: trainable LoRA parameters as a percentage of all model parameters. "
        "MB = 2^20 bytes; sizes 2 decimals, peak memory 0, seconds 2.",
        "Peak memory of each training on its own: on a GPU, the GPU memory it allocated at most; on a "
        "CPU, the process's resident memory at its highest during that training (sampled every 10 ms; "
        "the loaded model and data count in both).",
    ]
    return Table("table2_adaptation", "Table 2. Per-center adaptation: zero-shot, LoRA and full fine-tuning",
                 list(ADAPTATION_COLUMNS), rows, notes)


_PER_CLASS_KEYS = {"zero_shot": ("zero_shot_dice", "zero_shot"), "lora": ("lora_dice", "lora"),
                   "full": ("full_ft_dice", "full_ft", "full")}


def adaptation_per_class_tables(lora: dict[str, dict[str, Any]]) -> list[Table]:
    """Per adapter, per-class Dice; read from ``per_class`` as {class: {zero_shot_dice, lora_dice, full_ft_dice}}."""
    tables = []
    for key in sorted(lora):
        per_class = lora[key].get("per_class")
        if isinstance(per_class, list):  # also accept [{"class": name, ...}, ...]
            per_class = {str(item.get("class")): item for item in per_class if isinstance(item, dict)}
        if not isinstance(per_class, dict) or not per_class:
            continue
        rows = []
        for name, values in per_class.items():
            if not isinstance(values, dict):
                continue
            row: dict[str, str | None] = {"class": str(name)}
            for column, candidates in _PER_CLASS_KEYS.items():
                value = next((values[c] for c in candidates if c in values), None)
                row[column] = fmt(value, "score")
            rows.append(row)
        per_dataset = lora[key].get("per_dataset")
        if rows and isinstance(per_dataset, dict) and len(per_dataset) > 1:
            # A center adapted on several scans (CT and PET): each scan's mean over its classes.
            for name, values in per_dataset.items():
                if isinstance(values, dict):
                    rows.append({"class": f"all classes, {name}",
                                 **{column: fmt(next((values[c] for c in candidates if c in values), None), "score")
                                    for column, candidates in _PER_CLASS_KEYS.items()}})
        if rows:
            columns = [Column("class", "class", numeric=False), Column("zero_shot", "zero-shot Dice"),
                       Column("lora", "LoRA Dice"), Column("full", "full FT Dice")]
            tables.append(Table(f"table2_per_class_{safe_name(key)}", f"Table 2 ({key}). Per-class adaptation Dice",
                                columns, rows, [DASH_NOTE]))
    return tables


PROGNOSIS_COLUMNS = [
    Column("model", "model", numeric=False),
    Column("inputs", "inputs", numeric=False),
    Column("harrell", "Harrell C"),
    Column("uno", "Uno C"),
    Column("ibs", "IBS"),
    Column("source", "source", numeric=False),
]


def _with_interval(text: str | None, row: pd.Series, metric: str) -> str | None:
    """``"0.712 ± 0.031 [0.661, 0.760]"``: the bootstrap 95 % interval when summary.csv has one
    (files written before intervals existed have no such columns)."""
    low, high = (fmt(row.get(f"{metric}_ci_{end}"), "score") for end in ("low", "high"))
    return text if text is None or low is None or high is None else f"{text} [{low}, {high}]"


def prognosis_table(summary: pd.DataFrame, folds: pd.DataFrame | None = None, published: bool = True,
                    endpoint: str = DEFAULT_ENDPOINT, ehr_only: bool = False,
                    cohort: Mapping[str, Any] | None = None) -> Table:
    """Table 3: cross-validated C-indices (with bootstrap 95 % intervals) and integrated Brier score
    per model, then published C-indices; ``endpoint`` (config ``prognosis.endpoint``) names what the
    survival times measure; ``ehr_only`` (config ``prognosis.dataset: null``) marks a run on the EHR
    table without images; ``cohort`` (prognosis/cohort.json) adds the split and the cohort's warnings."""
    by_model = summary.drop_duplicates("model", keep="last").set_index("model")
    order = [m for m in PROGNOSIS_MODELS if m in by_model.index]
    order += sorted(m for m in by_model.index if m not in PROGNOSIS_MODELS)
    n_folds = int(folds["fold"].nunique()) if folds is not None and len(folds) else None
    measured = f"measured ({n_folds}-fold CV)" if n_folds else "measured (CV)"
    rows: list[dict[str, str | None]] = []
    for model in order:
        r = by_model.loc[model]
        note = str(r["note"]).strip() if "note" in r.index and isinstance(r["note"], str) else ""
        rows.append({
            "model": model, "inputs": PROGNOSIS_MODELS.get(model),
            "harrell": _with_interval(fmt_mean_std(r["harrell_c_mean"], r["harrell_c_std"], "score"), r, "harrell_c"),
            "uno": _with_interval(fmt_mean_std(r["uno_c_mean"], r["uno_c_std"], "score"), r, "uno_c"),
            "ibs": fmt_mean_std(r["ibs_mean"], r["ibs_std"], "score"),
            # A model whose metric is undefined in some folds says so: its mean covers fewer.
            "source": f"{measured[:-1]}; {note})" if note else measured,
        })
    notes = ["Mean ± standard deviation over the cross-validation folds; C-index higher is better, "
             "integrated Brier score (IBS) lower is better; 3 decimals."]
    if any(c in summary.columns for c in ("harrell_c_ci_low", "uno_c_ci_low")):
        notes.append("[low, high]: bootstrap 95 % interval of the fold mean (test patients resampled within "
                     "each fold, fitted models fixed).")
    cohort = cohort or {}
    if str(cohort.get("stratified_by", "")).startswith("center"):
        notes.append(f"Folds: {cohort['stratified_by']}.")
    blocks = [b for b in cohort.get("image_blocks") or [] if isinstance(b, Mapping)]
    if blocks:
        # Which scan each image column came from (results/prognosis/image_features.csv names them so too).
        parts = [f"{b.get('dataset')} ({b.get('modality')}, {b.get('columns')} values)" for b in blocks]
        notes.append("Image features: the pretrained network's bottleneck (mean over the image, mean over the tumour, "
                     "log tumour volume) of " + (" and ".join(parts) if len(parts) < 3 else ", ".join(parts))
                     + (", one block per scan concatenated per patient." if len(parts) > 1 else "."))
    for warning in cohort.get("warnings") or []:
        notes.append(f"Cohort warning: {warning}")
    absent = [m for m in PROGNOSIS_MODELS if m not in by_model.index and not (ehr_only and m.startswith("image"))]
    if ehr_only:
        notes.insert(0, "EHR only: the cohort's clinical table without images (config prognosis.dataset: null); "
                        "no image model was run.")
    if absent:
        notes.append("Not in this run: " + ", ".join(absent) + ".")
    if folds is not None and "note" in folds.columns:
        for note in sorted({str(n) for n in folds["note"].dropna() if str(n).strip()}):
            notes.append(f"Fold note: {note}")
    if published:
        for value in pub.PROGNOSIS:
            rows.append({"model": value.model, "inputs": None, "harrell": value.text(), "uno": None,
                         "ibs": None, "source": f"published: {value.source}"})
        notes.append(PUBLISHED_NOTE + " Published C-indices come from other cohorts (HECKTOR test sets) "
                     "and are shown at their published precision.")
        notes.extend(pub.definition_notes(pub.PROGNOSIS))
    return Table("table3_prognosis", f"Table 3. Survival prognosis ({endpoint}{', EHR only' if ehr_only else ''})",
                 list(PROGNOSIS_COLUMNS), rows, notes)


def auc_table(auc: pd.DataFrame, time_label: str = "time") -> Table | None:
    """Table 3b: cumulative/dynamic AUC at each horizon (prognosis/auc.csv), mean ± standard
    deviation over the folds where the horizon lies inside the fold's follow-up."""
    if auc is None or auc.empty:
        return None
    horizons = sorted(auc["horizon"].astype(float).unique())
    columns = [Column("model", "model", numeric=False)] + [Column(f"h{i}", f"AUC at {h:g}") for i, h in
                                                           enumerate(horizons)]
    models = list(dict.fromkeys(auc["model"]))
    order = [m for m in PROGNOSIS_MODELS if m in models] + [m for m in models if m not in PROGNOSIS_MODELS]
    rows = []
    for model in order:
        row: dict[str, str | None] = {"model": model}
        for i, h in enumerate(horizons):
            values = auc[(auc["model"] == model) & (auc["horizon"].astype(float) == h)]["auc"].to_numpy(float)
            values = values[np.isfinite(values)]
            row[f"h{i}"] = fmt_mean_std(values.mean() if values.size else math.nan,
                                        values.std(ddof=1) if values.size > 1 else math.nan, "score")
        rows.append(row)
    return Table("table3b_time_auc", f"Table 3b. Time-dependent AUC ({time_label})", columns, rows,
                 ["Cumulative/dynamic AUC (scikit-survival) at each horizon: mean ± standard deviation over the "
                  "folds whose follow-up covers it; a dash: no fold covers it."])


EFFICIENCY_COLUMNS = [
    Column("model", "model", numeric=False),
    Column("params", "params (M)"),
    Column("gmacs", "MACs per window (G)"),
    Column("window", "window", numeric=False),
    Column("seconds", "seconds per volume"),
    Column("memory", "peak memory (MB)"),
    Column("scaling", "class-scaling ratio"),
    Column("device", "device", numeric=False),
    Column("source", "source", numeric=False),
]


def window_text(window: Any) -> str | None:
    """``[96, 96, 96]`` -> ``"96x96x96"``; strings pass through."""
    if window is None:
        return None
    if isinstance(window, (list, tuple)):
        return "x".join(str(int(v)) for v in window)
    return str(window)


def _as_published(value: float | None) -> str | None:
    # Published sizes and times are shown as printed in their source (62.19, 321, 77), not padded.
    return None if value is None else f"{value:g}"


def efficiency_table(efficiency: dict[str, Any], published: bool = True) -> Table:
    """Table 4: size, cost per window, time and memory per volume, and the cost of more classes."""
    rows: list[dict[str, str | None]] = [{
        "model": "DuPLUS (this run)",
        "params": fmt(number(efficiency.get("params")) / 1e6, "millions"),
        "gmacs": fmt(number(efficiency.get("macs_per_window")) / 1e9, "giga"),
        "window": window_text(efficiency.get("window")),
        "seconds": fmt(efficiency.get("seconds_per_volume"), "seconds"),
        "memory": fmt(efficiency.get("peak_gpu_mb", efficiency.get("peak_rss_mb")), "mb"),
        "scaling": fmt(efficiency.get("class_scaling_ratio"), "ratio"),
        "device": str(efficiency["device"]) if efficiency.get("device") is not None else None,
        "source": "measured",
    }]
    k = efficiency.get("class_scaling_k")
    prompts = f"{int(k)} prompts" if isinstance(k, (int, float)) else "many prompts"
    notes = [f"Class-scaling ratio: time of one window batch with {prompts} divided by the time with one "
             "(one backbone pass serves every class, so it stays near 1).",
             "Peak memory: GPU memory allocated at most on a GPU, the process's resident memory on a CPU.",
             "Params and MACs exclude the text encoder (prompts are cached embeddings)."]
    if published:
        for value in pub.EFFICIENCY:
            rows.append({
                "model": value.model,
                "params": _as_published(value.params_m),
                "gmacs": _as_published(value.gmacs),
                "window": value.window,
                "seconds": _as_published(value.seconds_per_volume),
                "memory": _as_published(value.peak_memory_mb),
                "scaling": None,
                "device": value.device,
                "source": f"published: {value.source}" + (f" ({value.note})" if value.note else ""),
            })
        notes.append(PUBLISHED_NOTE + " They were measured on other hardware and volume sizes and are "
                     "shown at their published precision.")
    return Table("table4_efficiency", "Table 4. Model size and inference cost", list(EFFICIENCY_COLUMNS), rows, notes)
