rule download:
    """Fetch (or generate, for the demo) one dataset and verify it; raw data is never modified afterwards."""
    input:
        user_dataset_index,
    output:
        record=raw_dir() / "{dataset}" / "download.json",
    params:
        tracked=tracked("download"),
    log:
        str(log_dir() / "download/{dataset}.log"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=120,
    conda:
        "../envs/duplus.yaml"
    script:
        "../workflow_scripts/download.py"
