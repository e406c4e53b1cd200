"""A failing job through a real single-node SLURM, and the rerun that continues (the pipeline itself
runs through sbatch in test_user_commands.py, as users start it).

The cluster is the `slurm` fixture of conftest.py (skipped where it cannot run).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
TINY = ROOT / "tests" / "integration" / "config_tiny.yaml"

pytestmark = pytest.mark.slurm


def run_snakemake(env: dict, workdir: Path, *args: str, configs: tuple[Path, ...] = ()) -> subprocess.CompletedProcess:
    command = ["timeout", "-s", "INT", "-k", "30", "1200", SNAKEMAKE, "-s", str(ROOT / "Snakefile"),
               "--directory", str(workdir), "--workflow-profile", str(ROOT / "profiles" / "slurm-local"),
               # Targets and flags before --configfile, which takes every following word as a file.
               *args, "--configfile", str(ROOT / "config.yaml"), str(TINY), *map(str, configs)]
    return subprocess.run(command, capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, timeout=1500)


def test_failed_job_is_reported_with_its_log_and_rerun_continues(slurm, tmp_path: Path) -> None:
    # A user dataset whose folder holds no scans: its download job fails, the demo's do not. (A folder
    # that does not exist is refused when the Snakefile is read, before any job.)
    empty = tmp_path / "empty_site"
    empty.mkdir()
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"datasets": {"demo_abdomen_ct": {}, "missing_site": {
        "kind": "msd", "root": str(empty), "modality": "CT", "region": "abdomen",
        "labels": {"1": "liver"}}}}))
    failed = run_snakemake(slurm, tmp_path, "--keep-going", "all", configs=(bad,))
    output = failed.stdout + failed.stderr
    assert failed.returncode != 0
    assert re.search(r"SLURM-job '?\d+'? failed", output) or "Error in rule download" in output, output[-4000:]
    assert "missing_site" in output
    # What succeeded is kept: the good dataset's download is not redone.
    assert (tmp_path / "data" / "raw" / "demo_abdomen_ct" / "download.json").is_file()
    dry = subprocess.run([SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path), "-n", "all",
                          "--configfile", str(ROOT / "config.yaml"), str(TINY), str(bad)],
                         capture_output=True, text=True, encoding="utf-8", errors="replace", env=slurm)
    planned = dry.stdout + dry.stderr
    assert "data/raw/missing_site/download.json" in planned
    assert "data/raw/demo_abdomen_ct/download.json" not in planned
