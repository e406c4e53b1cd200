rule universal_pretrain:
    """Train one text-steered network on every dataset at once; resumes from its last checkpoint."""
    input:
        manifests=all_manifests,
        prompts=prompt_cache,
    output:
        model=results().model,
        sidecar=results().model_sidecar,
        log_csv=results().train_log,
    log:
        str(log_dir() / "universal_pretrain.log"),
    conda:
        "../envs/duplus.yaml"
    threads: job_threads("universal_pretrain", config)
    resources:
        **job_resources("universal_pretrain", config),
    params:
        tracked=tracked("universal_pretrain"),
    script:
        "../workflow_scripts/universal_pretrain.py"
