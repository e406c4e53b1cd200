rule report:
    """Paper-style tables, figures and an HTML page from the metrics of every stage that ran."""
    input:
        unpack(report_inputs),
    output:
        index=report(
            results().report("index.html"),
            caption="../docs/report_caption.rst",
            category="Report",
        ),
    log:
        str(log_dir() / "report.log"),
    conda:
        "../envs/duplus.yaml"
    threads: job_threads("report", config)
    resources:
        **job_resources("report", config),
    params:
        tracked=tracked("report"),
    script:
        "../workflow_scripts/report.py"
