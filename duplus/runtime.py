"""Run-time helpers shared by every stage: logging to the rule's log, device choice, seeding, memory."""

from __future__ import annotations

import logging
import os
import random
import resource
import sys

import numpy as np

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(log_path: str | None = None, level: int = logging.INFO) -> None:
    """Send duplus logs (and warnings) to stderr and, if given, to ``log_path``."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="a", encoding="utf-8"))
    logging.basicConfig(level=level, format=LOG_FORMAT, handlers=handlers, force=True)
    logging.captureWarnings(True)


def resolve_device(name: str = "auto") -> "torch.device":  # noqa: F821
    """``auto`` picks CUDA when available, else CPU; ``cpu``/``cuda``/``cuda:1`` are taken as given."""
    import torch

    from duplus.errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' was asked for but torch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def set_threads(threads: int | None) -> None:
    """Limit intra-op threads (OpenMP, BLAS, torch) to what the scheduler gave the job."""
    if not threads or threads <= 0:
        return
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(int(threads))
    # torch reads OMP_NUM_THREADS when it starts; if it already started, tell it directly.
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(threads))
