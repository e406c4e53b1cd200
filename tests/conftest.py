"""Test-wide settings: no progress bars, no hub access, small thread counts."""

import os

os.environ.setdefault("DUPLUS_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
