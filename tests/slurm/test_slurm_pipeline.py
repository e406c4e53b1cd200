"""The demo pipeline through a real single-node SLURM (sbatch per job), a failing job, a rerun.

Skipped with the reason where the local SLURM cannot run (not root, not Debian, or
DUPLUS_SKIP_SLURM=1).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "slurm_local.sh"
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
TINY = ROOT / "tests" / "integration" / "config_tiny.yaml"

pytestmark = pytest.mark.slurm


def _skip_reason() -> str | None:
    if os.environ.get("DUPLUS_SKIP_SLURM") == "1":
        return "DUPLUS_SKIP_SLURM=1"
    if os.geteuid() != 0:
        return "the local SLURM needs root"
    if not Path("/etc/debian_version").exists():
        return "the local SLURM script installs Debian packages; this is not Debian"
    return None


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("slurm")
    started = subprocess.run(["bash", str(SCRIPT), "start", str(work)], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
    if started.returncode != 0:
        pytest.fail(f"local SLURM did not start:\n{started.stdout}\n{started.stderr}")
    env = dict(os.environ, SLURM_CONF=str(work / "etc" / "slurm.conf"), PATH=f"{work / 'bin'}:{os.environ['PATH']}",
               DUPLUS_NO_PROGRESS="1", HF_HUB_OFFLINE="1")
    yield env
    subprocess.run(["bash", str(SCRIPT), "stop", str(work)], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)


def run_snakemake(env: dict, workdir: Path, *args: str, configs: tuple[Path, ...] = ()) -> subprocess.CompletedProcess:
    command = ["timeout", "-s", "INT", "-k", "30", "1200", SNAKEMAKE, "-s", str(ROOT / "Snakefile"),
               "--directory", str(workdir), "--workflow-profile", str(ROOT / "profiles" / "slurm-local"),
               # Targets and flags before --configfile, which takes every following word as a file.
               *args, "--configfile", str(ROOT / "config.yaml"), str(TINY), *map(str, configs)]
    return subprocess.run(command, capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, timeout=1500)


def test_demo_pipeline_runs_through_sbatch(slurm, tmp_path: Path) -> None:
    result = run_snakemake(slurm, tmp_path, "all")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    job_ids = set(re.findall(r"SLURM jobid (\d+)", output)) | set(re.findall(r"external jobid '?(\d+)", output))
    assert len(job_ids) >= 8, f"expected one sbatch job per rule instance, saw {sorted(job_ids)}"
    assert (tmp_path / "results" / "report" / "index.html").is_file()
    assert (tmp_path / "logs" / "universal_pretrain.log").is_file()


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
