"""Progress bars for long loops a person waits for; silent when DUPLUS_NO_PROGRESS=1 (tests)."""

from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T] | None = None, desc: str = "", total: int | None = None, **kwargs) -> tqdm:
    """A tqdm bar on stderr. In log files (no TTY) it updates at most every 10 s."""
    disabled = os.environ.get("DUPLUS_NO_PROGRESS", "") == "1"
    interactive = sys.stderr.isatty()
    kwargs.setdefault("mininterval", 0.1 if interactive else 10.0)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, desc=desc, total=total, disable=disabled, file=sys.stderr, **kwargs)
