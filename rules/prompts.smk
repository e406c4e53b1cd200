rule cache_prompts:
    """Encode every context (T1) and target (T2) prompt of the run once; training only looks them up."""
    output:
        cache=results().prompt_cache("{encoder}"),
        manifest=results().prompt_manifest("{encoder}"),
    log:
        str(log_dir() / "cache_prompts/{encoder}.log"),
    conda:
        "../envs/duplus.yaml"
    threads: job_threads("cache_prompts", config)
    resources:
        **job_resources("cache_prompts", config),
    params:
        tracked=tracked("cache_prompts"),
    script:
        "../workflow_scripts/cache_prompts.py"
