"""Snakemake script for rule preprocess: one dataset into the memory-mapped array store."""
from duplus.data.preprocess import run_preprocess
from duplus.stage import run_stage

run_stage(
    "preprocess",
    run_preprocess,
    log_path=snakemake.log[0],
    torch_threads=snakemake.threads,
    dataset=snakemake.wildcards.dataset,
    config=snakemake.config,
    download_record=snakemake.input.record,
    out_manifest=snakemake.output.manifest,
    threads=snakemake.threads,
)
