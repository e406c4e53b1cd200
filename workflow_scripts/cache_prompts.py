"""Snakemake script for rule cache_prompts: every T1/T2 prompt of the run encoded once."""
from duplus.prompts.cache import run_cache_prompts
from duplus.stage import run_stage

run_stage(
    "cache_prompts",
    run_cache_prompts,
    log_path=snakemake.log[0],
    torch_threads=snakemake.threads,
    config=snakemake.config,
    out_cache=snakemake.output.cache,
)
