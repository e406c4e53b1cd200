"""Fixtures of the reliability suite: the fork server, an uninterrupted reference run, the kill RNG."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from reliability_helpers import ReferenceRun, StageServer, tiny_config  # noqa: E402


# Module scope: only test_kill_resume.py runs stages, and the server's memory is freed after it.
@pytest.fixture(scope="module")
def stage_server() -> Iterator[StageServer]:
    server = StageServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, stage_server: StageServer) -> ReferenceRun:
    root = tmp_path_factory.mktemp("reference")
    run = ReferenceRun(root, tiny_config(root), stage_server)
    run.build()
    return run


@pytest.fixture(scope="session")
def kill_rng() -> random.Random:
    """Random kill delays; the seed is printed in failures and can be replayed with DUPLUS_KILL_SEED."""
    seed = int(os.environ.get("DUPLUS_KILL_SEED", random.SystemRandom().randrange(1 << 30)))
    rng = random.Random(seed)
    rng.seed_value = seed  # type: ignore[attr-defined]
    return rng
