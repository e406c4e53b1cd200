rule report:
    """Paper-style tables, figures and an HTML page from the metrics of every stage that ran."""
    input:
        unpack(report_inputs),
    output:
        index=report(
            results_dir() / "report" / "index.html",
            caption="../docs/report_caption.rst",
            category="Report",
        ),
    params:
        tracked=tracked("report"),
    log:
        str(log_dir() / "report.log"),
    threads: job_threads("report", config)
    resources:
        **job_resources("report", config),
    conda:
        "../envs/duplus.yaml"
    script:
        "../workflow_scripts/report.py"
