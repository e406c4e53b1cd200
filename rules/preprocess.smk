rule preprocess:
    """Integrity check, reorient, resample, crop and normalize one dataset into the array store."""
    input:
        record=dataset_download_record,
    output:
        manifest=preprocessed_dir() / "{dataset}" / "manifest.csv",
    log:
        str(log_dir() / "preprocess/{dataset}.log"),
    conda:
        "../envs/duplus.yaml"
    threads: job_threads("preprocess", config)
    resources:
        **job_resources("preprocess", config),
    params:
        tracked=tracked("preprocess"),
    script:
        "../workflow_scripts/preprocess.py"


rule preprocess_all:
    """Every dataset of the config, downloaded and preprocessed (`snakemake preprocess_all`)."""
    input:
        all_manifests,
