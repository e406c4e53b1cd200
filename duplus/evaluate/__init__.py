"""Evaluation of DuPLUS models: MONAI metrics in original space and tables (inference: ``duplus.inference``).

Entry point of the evaluate rule: ``duplus.evaluate.evaluate_stage.run_evaluate``.
"""
