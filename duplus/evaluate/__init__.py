"""Evaluation of DuPLUS models: sliding-window inference, MONAI metrics in original space, tables.

Entry point of the evaluate rule: ``duplus.evaluate.run.run_evaluate``.
"""
