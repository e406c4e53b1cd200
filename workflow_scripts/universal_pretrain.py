"""Snakemake script for rule universal_pretrain: one network trained across datasets and modalities."""
from duplus.stage import run_stage
from duplus.train.pretrain import run_pretrain

run_stage(
    "universal_pretrain",
    run_pretrain,
    log_path=snakemake.log[0],
    torch_threads=snakemake.threads,
    config=snakemake.config,
    manifests=list(snakemake.input.manifests),
    prompt_cache=snakemake.input.prompts,
    out_model=snakemake.output.model,
    out_log=snakemake.output.log_csv,
)
