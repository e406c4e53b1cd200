"""The report stage: tables, figures, provenance and index.html from whatever metrics exist.

A stage that left no metrics is skipped with a note on the page; index.html is written last.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Callable, Mapping

from duplus.errors import DataError
from duplus.report import figures
from duplus.report.html import FigureRef, Section, png_data_uri, write_index
from duplus.report.inputs import ReportInputs, load_inputs
from duplus.report.provenance import collect_provenance, write_provenance
from duplus.report.tables import (
    adaptation_per_class_tables,
    adaptation_table,
    auc_table,
    efficiency_table,
    per_class_tables,
    prognosis_table,
    segmentation_table,
)
from duplus.report.tabular import Table
from duplus.settings import Settings

log = logging.getLogger("duplus.report")

TABLES_DIR = "tables"
FIGURES_DIR = "figures"
# Files of these kinds in tables/ and figures/ belong to the report; stale ones from an earlier
# run (a stage since disabled) are removed so the folder matches the page.
_OWNED_SUFFIXES = {".md", ".csv", ".tex", ".png", ".pdf"}


class _Builder:
    """Collects what one report run writes, the page sections and the notes on what is missing."""

    def __init__(self, out_dir: Path) -> None:
        self.out = out_dir
        self.written: list[Path] = []
        self.missing: list[str] = []

    def tables(self, tables: list[Table]) -> list[Table]:
        for table in tables:
            self.written += table.write(self.out / TABLES_DIR)
        return tables

    def figure(self, draw: Callable[..., list[Path]], *args: Any, caption: str) -> list[FigureRef]:
        """Draw one figure (PNG + PDF); a broken optional input becomes a note, not a failed report."""
        try:
            paths = draw(*args, folder=self.out / FIGURES_DIR)
        except DataError as error:
            log.warning("figure skipped: %s", error)
            self.missing.append(f"Figure skipped ({caption}): {error}")
            return []
        self.written += paths
        refs = []
        for png in (p for p in paths if p.suffix == ".png"):
            pdf = png.with_suffix(".pdf")
            refs.append(FigureRef(src=png_data_uri(png), caption=caption,
                                  pdf=f"{FIGURES_DIR}/{pdf.name}" if pdf in paths else None))
        return refs

    def note(self, section: Section, text: str) -> Section:
        section.missing = text
        self.missing.append(text)
        return section


def _training(b: _Builder, inputs: ReportInputs) -> Section:
    section = Section("training", "Universal pretraining")
    if inputs.train_log is None:
        return b.note(section, "Pretraining log not found (pretrain/train_log.csv): stage not run.")
    section.figures = b.figure(figures.training_curve, inputs.train_log, caption="Training loss and learning rate")
    return section


def _segmentation(b: _Builder, inputs: ReportInputs, config: Mapping[str, Any], published: bool) -> Section:
    section = Section("segmentation", "Segmentation (Table 1)")
    if inputs.summary is None:
        return b.note(section, "Segmentation metrics not found (evaluate/universal/summary.csv): "
                               "stage not run.")
    settings = Settings.of(config)
    tolerance = settings.evaluate.nsd_tolerance_mm
    section.tables = b.tables([segmentation_table(inputs.summary, inputs.baseline_summary, published, tolerance)])
    if inputs.baseline_summary is None:
        why = "stage disabled in the config" if not settings.baseline.enabled else "stage disabled or not run"
        b.missing.append(f"Baseline metrics not found (evaluate/baseline/summary.csv): {why}; "
                         f"Table 1 has no baseline columns.")
    section.detail_tables = b.tables(per_class_tables(inputs.summary, inputs.baseline_summary, tolerance))
    if inputs.per_case is not None:
        section.figures += b.figure(figures.dice_boxplots, inputs.per_case, caption="Dice per test case, by class")
    else:
        b.missing.append("Per-case metrics not found (evaluate/universal/per_case.csv): no Dice box plots.")
    for dataset, path in inputs.examples.items():
        section.figures += b.figure(figures.overlay, path, dataset,
                                    caption=f"{dataset}: prediction (solid) vs ground truth (dashed)")
    if not inputs.examples:
        b.missing.append("Qualitative examples not found (evaluate/universal/examples/): no overlays.")
    return section


def _adaptation(b: _Builder, inputs: ReportInputs) -> Section:
    section = Section("adaptation", "Per-center adaptation (Table 2)")
    if not inputs.lora:
        return b.note(section, "LoRA metrics not found (lora/*/metrics.json): stage disabled or not run.")
    section.tables = b.tables([adaptation_table(inputs.lora)])
    section.detail_tables = b.tables(adaptation_per_class_tables(inputs.lora))
    section.figures = b.figure(figures.lora_bars, inputs.lora, caption="Zero-shot vs LoRA vs full fine-tuning")
    return section


def _prognosis(b: _Builder, inputs: ReportInputs, config: Mapping[str, Any], published: bool) -> Section:
    section = Section("prognosis", "Prognosis (Table 3)")
    settings = Settings.of(config)
    if inputs.prognosis_summary is None:
        why = "stage disabled in the config" if not settings.prognosis.enabled else "stage disabled or not run"
        return b.note(section, f"Prognosis metrics not found (prognosis/summary.csv): {why}.")
    endpoint = settings.prognosis.endpoint
    ehr_only = settings.prognosis.dataset is None  # prognosis.dataset: null is the EHR-only run
    time_label = f"time ({settings.prognosis.ehr.time})"
    tables = [prognosis_table(inputs.prognosis_summary, inputs.prognosis_folds, published, endpoint,
                              ehr_only=ehr_only, cohort=inputs.prognosis_cohort)]
    time_auc = auc_table(inputs.prognosis_auc, time_label)
    section.tables = b.tables(tables + ([time_auc] if time_auc is not None else []))
    if inputs.calibration and inputs.calibration.get("models"):
        section.figures += b.figure(figures.calibration_plot, inputs.calibration, time_label,
                                    caption="Calibration: predicted vs Kaplan-Meier survival at one horizon, "
                                            "out-of-fold patients in five groups of predicted survival")
    if inputs.km:
        section.figures += b.figure(figures.km_curves, inputs.km, time_label,
                                    caption="Kaplan-Meier curves of out-of-fold low / high risk groups")
    elif inputs.km is None:
        b.missing.append("Kaplan-Meier curves not found (prognosis/km.json): no survival curves.")
    else:
        # The stage writes {} when no test patient got a risk group: no model could be fitted on
        # any fold (e.g. no training fold had an event).
        b.missing.append("Kaplan-Meier curves: prognosis/km.json has no risk groups (no model could be fitted "
                         "on any fold, e.g. the cohort has no events): no survival curves.")
    return section


def _efficiency(b: _Builder, inputs: ReportInputs, published: bool) -> Section:
    section = Section("efficiency", "Efficiency (Table 4)")
    if inputs.efficiency is None:
        return b.note(section, "Efficiency metrics not found (evaluate/universal/efficiency.json): "
                               "stage not run.")
    section.tables = b.tables([efficiency_table(inputs.efficiency, published)])
    section.figures = b.figure(figures.class_scaling, inputs.efficiency, caption="Inference time vs classes prompted")
    return section


def _remove_stale(out_dir: Path, keep: set[Path]) -> None:
    for sub in (TABLES_DIR, FIGURES_DIR):
        folder = out_dir / sub
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.suffix in _OWNED_SUFFIXES and path not in keep:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


def run_report(config: Mapping[str, Any], results_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """Build the report under ``out_dir`` from the metrics under ``results_dir``.

    Args:
        config: the full validated pipeline config (``report.published`` adds reference values).
        results_dir: the pipeline's results folder (``paths.results``).
        out_dir: where ``tables/``, ``figures/``, ``provenance.json`` and ``index.html`` go.

    Returns:
        Every file written, ``index.html`` last.

    Example:
        >>> run_report(config, "results", "results/report")[-1]
        PosixPath('results/report/index.html')
    """
    out = Path(out_dir)
    inputs = load_inputs(results_dir, config)
    published = Settings.of(config).report.published
    builder = _Builder(out)
    sections = [
        _training(builder, inputs),
        _segmentation(builder, inputs, config, published),
        _adaptation(builder, inputs),
        _prognosis(builder, inputs, config, published),
        _efficiency(builder, inputs, published),
    ]
    _remove_stale(out, set(builder.written))
    device = str(inputs.efficiency.get("device")) if inputs.efficiency and inputs.efficiency.get("device") else None
    provenance = collect_provenance(config, inputs.results_dir, inputs.files, device=device)
    builder.written.append(write_provenance(out / "provenance.json", provenance))
    builder.written.append(write_index(out / "index.html", sections, provenance, builder.missing))
    log.info("report: %d files written to %s", len(builder.written), out)
    return builder.written
