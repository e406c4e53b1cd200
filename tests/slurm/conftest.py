"""The real single-node SLURM of tools/slurm_local.sh, started once for every test in tests/slurm/.

Skipped with the reason where it cannot run (not root, not Debian, or DUPLUS_SKIP_SLURM=1).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "slurm_local.sh"


def _skip_reason() -> str | None:
    if os.environ.get("DUPLUS_SKIP_SLURM") == "1":
        return "DUPLUS_SKIP_SLURM=1"
    if os.geteuid() != 0:
        return "the local SLURM needs root"
    if not Path("/etc/debian_version").exists():
        return "the local SLURM script installs Debian packages; this is not Debian"
    return None


@pytest.fixture(scope="session")
def slurm_work(tmp_path_factory) -> Path:
    """The running cluster's work folder (etc/slurm.conf, bin/srun); stopped after the session."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("slurm")
    started = subprocess.run(["bash", str(SCRIPT), "start", str(work)], capture_output=True, text=True, encoding="utf-8",
                             errors="replace", timeout=600)
    if started.returncode != 0:
        pytest.fail(f"local SLURM did not start:\n{started.stdout}\n{started.stderr}")
    yield work
    subprocess.run(["bash", str(SCRIPT), "stop", str(work)], capture_output=True, text=True, encoding="utf-8",
                   errors="replace", timeout=120)


@pytest.fixture(scope="session")
def slurm(slurm_work: Path) -> dict:
    """The environment that reaches the cluster: SLURM_CONF, and its srun wrapper first on PATH."""
    return dict(os.environ, SLURM_CONF=str(slurm_work / "etc" / "slurm.conf"),
                PATH=f"{slurm_work / 'bin'}:{os.environ['PATH']}", DUPLUS_NO_PROGRESS="1", HF_HUB_OFFLINE="1")
