"""Snakemake script for rule universal_pretrain: one network trained across datasets and modalities."""
from duplus.stage import run_stage
from duplus.train.distributed import launch, training_processes

run_stage(
    "universal_pretrain",
    launch,
    log_path=snakemake.log[0],
    torch_threads=snakemake.threads,
    entry="pretrain",
    processes=training_processes(snakemake.config, int(getattr(snakemake.resources, "gpu", 0) or 0)),
    worker_log=snakemake.log[0],
    kwargs=dict(
        config=snakemake.config,
        manifests=list(snakemake.input.manifests),
        prompt_cache=snakemake.input.prompts,
        out_model=snakemake.output.model,
        out_log=snakemake.output.log_csv,
    ),
)
