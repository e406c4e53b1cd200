rule preprocess:
    """Integrity check, reorient, resample, crop and normalize one dataset into the array store."""
    input:
        record=dataset_download_record,
    output:
        manifest=preprocessed_dir() / "{dataset}" / "manifest.csv",
    params:
        tracked=tracked("preprocess"),
    log:
        str(log_dir() / "preprocess/{dataset}.log"),
    threads: job_threads("preprocess", config)
    resources:
        **job_resources("preprocess", config),
    conda:
        "../envs/duplus.yaml"
    script:
        "../workflow_scripts/preprocess.py"


rule preprocess_all:
    """Every dataset of the config, downloaded and preprocessed (`snakemake preprocess_all`)."""
    input:
        all_manifests,
