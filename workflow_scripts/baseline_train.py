"""Snakemake script for rule baseline_train: one dataset's prompt-free task-specific network."""
from duplus.stage import run_stage
from duplus.train.distributed import launch, training_processes

run_stage(
    "baseline_train",
    launch,
    log_path=snakemake.log[0],
    torch_threads=snakemake.threads,
    entry="baseline",
    processes=training_processes(snakemake.config, int(getattr(snakemake.resources, "gpu", 0) or 0)),
    worker_log=snakemake.log[0],
    kwargs=dict(
        config=snakemake.config,
        manifests=list(snakemake.input.manifests),
        prompt_cache=snakemake.input.prompts,
        dataset=snakemake.wildcards.dataset,
        out_model=snakemake.output.model,
        out_log=snakemake.output.log_csv,
    ),
)
