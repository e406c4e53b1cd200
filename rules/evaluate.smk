rule evaluate:
    """Sliding-window inference on every test case, metrics in the original image space."""
    input:
        manifests=all_manifests,
        prompts=prompt_cache,
        model=pretrained_model,
    output:
        summary=results().universal_evaluation("summary.csv"),
        per_case=results().universal_evaluation("per_case.csv"),
        efficiency=results().universal_evaluation("efficiency.json"),
        examples=directory(results().universal_evaluation("examples")),  # one case per dataset, for the report
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
