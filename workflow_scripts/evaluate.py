"""Snakemake script for rule evaluate: test-split metrics of the universal model."""
import os

from duplus.evaluate.evaluate_stage import run_evaluate
from duplus.stage import run_stage

run_stage(
    "evaluate",
    run_evaluate,
    log_path=snakemake.log[0],
    torch_threads=snakemake.threads,
    config=snakemake.config,
    manifests=list(snakemake.input.manifests),
    prompt_cache=snakemake.input.prompts,
    model_path=snakemake.input.model,
    out_dir=os.path.dirname(snakemake.output.summary),
)
