rule lora_center:
    """Adapt the pretrained network to one center with LoRA; compare with zero-shot and full fine-tuning."""
    input:
        manifests=all_manifests,
        prompts=prompt_cache,
        model=pretrained_model,
    output:
        metrics=results().lora_center("{center}") / "metrics.json",
        # What `duplus segment --adapter results/lora/<center>` loads.
        adapter=directory(results().lora_center("{center}") / "adapter"),
        adapter_meta=results().lora_center("{center}") / "adapter_meta.json",
    log:
        str(log_dir() / "lora_center/{center}.log"),
    conda:
        "../envs/duplus.yaml"
    threads: job_threads("lora_center", config)
    resources:
        **job_resources("lora_center", config),
    params:
        tracked=tracked("lora_center"),
    script:
        "../workflow_scripts/lora_finetune.py"


rule lora_finetune:
    """Every center of config lora.centers (`snakemake lora_finetune`)."""
    input:
        lora_metrics,
