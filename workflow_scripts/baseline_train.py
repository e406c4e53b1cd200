"""Snakemake script for rule baseline_train: one dataset's prompt-free task-specific network."""
from duplus.stage import run_stage
from duplus.train.baseline import run_baseline

run_stage(
    "baseline_train",
    run_baseline,
    log_path=snakemake.log[0],
    torch_threads=snakemake.threads,
    config=snakemake.config,
    manifests=list(snakemake.input.manifests),
    prompt_cache=snakemake.input.prompts,
    dataset=snakemake.wildcards.dataset,
    out_model=snakemake.output.model,
    out_log=snakemake.output.log_csv,
)
