"""Test-wide settings: no progress bars, no hub access, small thread counts."""

import os

os.environ.setdefault("DUPLUS_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _forget_declared_classes():
    """Classes a test's config declares join the taxonomy for the process: none may outlive its test."""
    yield
    from duplus.data import taxonomy

    taxonomy.declare_classes([])
