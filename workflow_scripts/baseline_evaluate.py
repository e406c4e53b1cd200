"""Snakemake script for rule baseline_evaluate: each task-specific baseline on its own dataset."""
import os

from duplus.evaluate.evaluate_stage import run_evaluate_baselines
from duplus.stage import run_stage

run_stage(
    "baseline_evaluate",
    run_evaluate_baselines,
    log_path=snakemake.log[0],
    torch_threads=snakemake.threads,
    config=snakemake.config,
    manifests=list(snakemake.input.manifests),
    prompt_cache=snakemake.input.prompts,
    model_paths=list(snakemake.input.models),
    out_dir=os.path.dirname(snakemake.output.summary),
)
