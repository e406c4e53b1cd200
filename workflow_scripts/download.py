"""Snakemake script for rule download: one dataset fetched (or generated) and verified."""
from duplus.data.download import run_download
from duplus.stage import run_stage

run_stage(
    "download",
    run_download,
    log_path=snakemake.log[0],
    torch_threads=snakemake.threads,
    dataset=snakemake.wildcards.dataset,
    config=snakemake.config,
    out_record=snakemake.output.record,
)
