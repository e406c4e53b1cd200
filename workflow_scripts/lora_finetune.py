"""Snakemake script for rule lora_center: LoRA vs zero-shot vs full fine-tuning for one center."""
import os

from duplus.stage import run_stage
from duplus.train.lora import run_lora

run_stage(
    "lora_center",
    run_lora,
    log_path=snakemake.log[0],
    torch_threads=snakemake.threads,
    config=snakemake.config,
    center=snakemake.wildcards.center,
    manifests=list(snakemake.input.manifests),
    prompt_cache=snakemake.input.prompts,
    model_path=snakemake.input.model,
    out_dir=os.path.dirname(snakemake.output.metrics),
)
