"""Snakemake script for rule report: tables, figures and index.html from every stage's metrics."""
import os

from duplus.report.build import run_report
from duplus.stage import run_stage

run_stage(
    "report",
    run_report,
    log_path=snakemake.log[0],
    torch_threads=snakemake.threads,
    config=snakemake.config,
    results_dir=snakemake.config["paths"]["results"],
    out_dir=os.path.dirname(snakemake.output.index),
)
