"""Shared settings of the evaluation tests (torch's thread count: tests/conftest.py)."""
