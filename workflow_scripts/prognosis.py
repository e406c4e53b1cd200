"""Snakemake script for rule prognosis: survival from image features and EHR, cross-validated."""
import os

from duplus.prognosis.prognosis_stage import run_prognosis
from duplus.stage import run_stage

run_stage(
    "prognosis",
    run_prognosis,
    log_path=snakemake.log[0],
    torch_threads=snakemake.threads,
    config=snakemake.config,
    # Absent for an EHR-only run (prognosis.dataset: null); one per dataset of prognosis.dataset.
    manifest=list(getattr(snakemake.input, "manifests", [])),
    prompt_cache=getattr(snakemake.input, "prompts", None),
    model_path=getattr(snakemake.input, "model", None),
    out_dir=os.path.dirname(snakemake.output.summary),
)
