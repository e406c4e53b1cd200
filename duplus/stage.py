"""Runs one pipeline stage for a Snakemake script: logging to the rule's log, threads, clean errors.

Scripts in workflow_scripts/ stay one call long; this turns library errors into a one-line
message in the log and a non-zero exit instead of a traceback wall.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Callable

from duplus.errors import DuplusError, TrainingInterrupted
from duplus.runtime import set_threads, setup_logging

log = logging.getLogger("duplus.stage")

# SLURM sends SIGTERM before killing a preempted job; 143 = 128 + SIGTERM tells Snakemake it failed.
EXIT_INTERRUPTED = 143


def declare_config_classes(kwargs: dict[str, Any]) -> None:
    """Make the classes the run's config declares known in this process before the stage looks any up.

    The config reaches a stage as its ``config`` argument, or inside the ``kwargs`` of a training
    entry point (``duplus.train.distributed.launch``).
    """
    config = kwargs.get("config")
    if config is None and isinstance(kwargs.get("kwargs"), dict):
        config = kwargs["kwargs"].get("config")
    if isinstance(config, dict):
        from duplus.data.registry import use_declared_classes

        use_declared_classes(config)


def run_stage(name: str, func: Callable[..., Any], *, log_path: str | None, torch_threads: int | None = None,
              **kwargs: Any) -> Any:
    """Call ``func(**kwargs)`` as stage ``name``; log its duration; exit 1 on a ``DuplusError``."""
    setup_logging(log_path)
    set_threads(torch_threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub from inside a job
    started = time.perf_counter()
    log.info("stage %s started (threads=%s)", name, torch_threads)
    try:
        declare_config_classes(kwargs)
        result = func(**kwargs)
    except DuplusError as error:
        log.error("stage %s failed: %s", name, error)
        code = EXIT_INTERRUPTED if isinstance(error, TrainingInterrupted) else 1
        sys.exit(code)
    except Exception:  # noqa: BLE001 - an unexpected error (CUDA out of memory, a bug) belongs in the rule's log too
        log.exception("stage %s failed with an unexpected error", name)
        sys.exit(1)
    log.info("stage %s finished in %.1f s", name, time.perf_counter() - started)
    return result
