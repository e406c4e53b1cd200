"""Graceful interruption of a training loop on SIGTERM (SLURM preemption, scancel, timeouts).

The handler only sets a flag; the loop finishes its step, writes a checkpoint and raises.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType

log = logging.getLogger(__name__)


class StopFlag:
    """Context manager: while active, SIGTERM sets ``requested`` instead of killing the process.

    Outside the main thread (where signal handlers cannot be installed) it is a plain flag that
    callers may still set with ``request()``.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
        self.signals = signals
        self.requested = False
        self._previous: dict[int, object] = {}

    def request(self, signum: int | None = None, frame: FrameType | None = None) -> None:
        if not self.requested:
            log.warning("stop requested (signal %s): finishing this step, then writing a checkpoint", signum)
        self.requested = True

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self.request)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()
