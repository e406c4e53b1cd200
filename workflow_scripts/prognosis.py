"""Snakemake script for rule prognosis: survival from image features and EHR, cross-validated."""
import os

from duplus.prognosis.run import run_prognosis
from duplus.stage import run_stage

run_stage(
    "prognosis",
    run_prognosis,
    log_path=snakemake.log[0],
    torch_threads=snakemake.threads,
    config=snakemake.config,
    manifest=snakemake.input.manifest,
    prompt_cache=snakemake.input.prompts,
    model_path=snakemake.input.model,
    out_dir=os.path.dirname(snakemake.output.summary),
)
