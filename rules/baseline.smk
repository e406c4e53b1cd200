rule baseline_train:
    """The task-specific baseline of one dataset: same backbone, no prompts, equal share of the budget."""
    input:
        manifests=all_manifests,
        prompts=prompt_cache,
    output:
        model=results().baseline("{dataset}") / "model.safetensors",
        log_csv=results().baseline("{dataset}") / "train_log.csv",
    log:
        str(log_dir() / "baseline_train/{dataset}.log"),
    wildcard_constraints:
        dataset="[^/]+",
    conda:
        "../envs/duplus.yaml"
    threads: job_threads("baseline_train", config)
    resources:
        **job_resources("baseline_train", config),
    params:
        tracked=tracked("baseline_train"),
    script:
        "../workflow_scripts/baseline_train.py"


rule baseline_evaluate:
    """Every baseline on its own dataset's test cases, scored exactly as the universal model."""
    input:
        manifests=all_manifests,
        prompts=prompt_cache,
        models=baseline_models,
    output:
        summary=results().baseline_evaluation("summary.csv"),
        per_case=results().baseline_evaluation("per_case.csv"),
    log:
        str(log_dir() / "baseline_evaluate.log"),
    conda:
        "../envs/duplus.yaml"
    threads: job_threads("baseline_evaluate", config)
    resources:
        **job_resources("baseline_evaluate", config),
    params:
        tracked=tracked("baseline_evaluate"),
    script:
        "../workflow_scripts/baseline_evaluate.py"
