rule prognosis:
    """Survival from image features and EHR: cross-validated against EHR-only and image-only baselines
    (prognosis.dataset: null: the EHR routes and baselines on the table alone)."""
    input:
        unpack(prognosis_inputs),
    output:
        summary=results().prognosis("summary.csv"),
        folds=results().prognosis("folds.csv"),
        km=results().prognosis("km.json"),
        auc=results().prognosis("auc.csv"),
        calibration=results().prognosis("calibration.json"),
        cohort=results().prognosis("cohort.json"),
    log:
        str(log_dir() / "prognosis.log"),
    conda:
        "../envs/duplus.yaml"
    threads: job_threads("prognosis", config)
    resources:
        **job_resources("prognosis", config),
    params:
        tracked=tracked("prognosis"),
    script:
        "../workflow_scripts/prognosis.py"
