rule evaluate:
    """Sliding-window inference on every test case, metrics in the original image space."""
    input:
        manifests=all_manifests,
        prompts=prompt_cache,
        model=pretrained_model,
    output:
        summary=results_dir() / "evaluate" / "universal" / "summary.csv",
        per_case=results_dir() / "evaluate" / "universal" / "per_case.csv",
        efficiency=results_dir() / "evaluate" / "universal" / "efficiency.json",
        examples=directory(results_dir() / "evaluate" / "universal" / "examples"),  # one case per dataset, for the report
    log:
        str(log_dir() / "evaluate.log"),
    conda:
        "../envs/duplus.yaml"
    threads: job_threads("evaluate", config)
    resources:
        **job_resources("evaluate", config),
    params:
        tracked=tracked("evaluate"),
    script:
        "../workflow_scripts/evaluate.py"
