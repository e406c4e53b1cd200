"""The report stage: paper-style tables, figures, provenance and an HTML page from every stage's metrics.

Entry point: ``duplus.report.build.run_report``; it never imports torch.
"""
