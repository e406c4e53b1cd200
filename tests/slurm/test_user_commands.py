"""The users' own commands, typed as they type them, from the root of a fresh checkout:

    snakemake --profile slurm all
    snakemake --profile slurm lora_finetune
    snakemake lora_finetune

after the README's set-up (which installs the `slurm` profile by name), against the real local
SLURM of conftest.py, with HOME and XDG_CONFIG_HOME in a temporary folder (the machine's own
~/.config/snakemake is never read). The local SLURM has no GPUs: a recording `sbatch` first on
PATH keeps every request as submitted and passes it on without its `--gpus` (and a `srun` the
same inside the jobs), so the jobs still run and the test sees what a GPU cluster would be asked.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
TINY = ROOT / "tests" / "integration" / "config_tiny.yaml"

pytestmark = pytest.mark.slurm

# What the checkout's config.yaml asks of each job (sized to fit the 2-CPU test node), and so what
# every sbatch call must carry. The runtimes differ per rule so that each --time is the rule's own.
JOBS = {
    "preprocess": {"threads": 2, "mem_mb_per_thread": 600, "runtime": 21},
    "cache_prompts": {"threads": 1, "mem_mb": 1500, "runtime": 22},
    "universal_pretrain": {"cpus_per_gpu": 2, "mem_mb": 3000, "runtime": 23},
    "baseline_train": {"cpus_per_gpu": 2, "mem_mb": 2500, "runtime": 24},
    "evaluate": {"cpus_per_gpu": 1, "mem_mb": 2000, "runtime": 25},
    "baseline_evaluate": {"cpus_per_gpu": 1, "mem_mb": 2100, "runtime": 26},
    "lora_center": {"cpus_per_gpu": 1, "mem_mb": 2200, "runtime": 27},
    "prognosis": {"cpus_per_gpu": 1, "mem_mb": 2300, "runtime": 28},
    "report": {"threads": 1, "mem_mb": 1000, "runtime": 29},
}
# (gpus, cpus-per-task, mem, time, TERM signal) each submission of the rule must show.
EXPECTED = {
    "preprocess": (None, 2, 1200, 21, False),
    "cache_prompts": (None, 1, 1500, 22, False),
    "universal_pretrain": (1, 2, 3000, 23, True),
    "baseline_train": (1, 2, 2500, 24, True),
    "evaluate": (1, 1, 2000, 25, False),
    "baseline_evaluate": (1, 1, 2100, 26, False),
    "lora_center": (1, 1, 2200, 27, True),
    "prognosis": (1, 1, 2300, 28, False),
    "report": (None, 1, 1000, 29, False),
}

# What this site (the test cluster) adds to the installed profile, as a site's admin would:
# no accounting database (squeue for status, polled early), its one partition.
SITE_SETTINGS = """
slurm-no-account: true
slurm-status-command: squeue
slurm-init-seconds-before-status-checks: 1
seconds-between-status-checks: 2
default-resources:
  slurm_partition: debug
"""

RECORDER = '''#!{python}
"""Keeps each sbatch request as submitted, then passes it on without the GPU part."""
import json, os, sys
arguments = sys.argv[1:]
with open({log!r}, "a", encoding="utf-8") as log:
    log.write(json.dumps([a for a in arguments if not a.startswith("--wrap")]) + "\\n")
os.execv({real!r}, ["sbatch", *[a for a in arguments if not a.startswith("--gpus")]])
'''

SRUN = '''#!/bin/sh
# Inside a job: the step asks for the job's GPUs again; the test node has none.
for arg do
    shift
    case "$arg" in --gpus=*) ;; *) set -- "$@" "$arg" ;; esac
done
exec {srun} "$@"
'''


def _deep_merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def fresh_checkout(folder: Path) -> Path:
    """The repository's files as a clone has them (tracked and not ignored), nothing built."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, folder / name)
    return folder


def set_up(checkout: Path, home: Path, env: dict) -> dict:
    """The README's set-up, as far as the profile goes, in a home of its own; the environment to run in."""
    home.mkdir(parents=True, exist_ok=True)
    env = dict(env, HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"),
               PATH=f"{VENV_BIN}:{env['PATH']}")  # the activated venv, as `make venv` leaves it
    installed = subprocess.run(["make", "--no-print-directory", "slurm-profile"], cwd=checkout, env=env,
                               capture_output=True, text=True)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return env


def recording(env: dict, bin_dir: Path, slurm_work: Path) -> tuple[dict, Path]:
    bin_dir.mkdir(parents=True, exist_ok=True)
    log = bin_dir / "sbatch.jsonl"
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(RECORDER.format(python=sys.executable, log=str(log), real=shutil.which("sbatch", path="/usr/bin")))
    srun = bin_dir / "srun"
    srun.write_text(SRUN.format(srun=shlex.quote(str(slurm_work / "bin" / "srun"))))
    for script in (sbatch, srun):
        script.chmod(0o755)
    return dict(env, PATH=f"{bin_dir}:{env['PATH']}"), log


def submissions(log: Path) -> list[tuple[str, list[str]]]:
    """(rule, sbatch arguments) of every request kept by the recorder."""
    if not log.exists():
        return []
    found = []
    for line in log.read_text(encoding="utf-8").splitlines():
        arguments = json.loads(line)
        comment = arguments[arguments.index("--comment") + 1]
        rule = re.match(r"rule_(.+?)(?:_wildcards_.*)?$", comment).group(1)
        found.append((rule, arguments))
    return found


def requested(arguments: list[str]) -> tuple:
    """(gpus, cpus-per-task, mem, time, TERM signal) of one sbatch call."""
    text = " ".join(arguments)

    def number(pattern: str) -> int | None:
        match = re.search(pattern, text)
        return int(match.group(1)) if match else None

    return (number(r"--gpus=(\d+)"), number(r"--cpus-per-task=(\d+)"), number(r"--mem (\d+)"),
            number(r"-t '?(\d+)"), "--signal=TERM@120" in text)


def typed(env: dict, checkout: Path, command: str, limit_s: int = 900) -> subprocess.CompletedProcess:
    """``command`` as a user types it in the checkout's root (SIGINT at the limit: see /work/shared/SLURM.md)."""
    return subprocess.run(["timeout", "-s", "INT", "-k", "30", str(limit_s), *shlex.split(command)], cwd=checkout,
                          env=env, capture_output=True, text=True, encoding="utf-8", errors="replace",
                          timeout=limit_s + 60)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory, slurm, slurm_work) -> tuple[Path, dict, Path]:
    """A fresh checkout whose config.yaml asks for one GPU per GPU job, set up in a home of its own."""
    folder = fresh_checkout(tmp_path_factory.mktemp("checkout"))
    config = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
    _deep_merge(config, yaml.safe_load(TINY.read_text(encoding="utf-8")))
    _deep_merge(config, {"resources": {"gpus": 1, "jobs": JOBS}})
    # Fewer jobs, for time: the MRI dataset and the baselines (their rules take their resources as
    # every rule does; tests/test_jobresources.py checks that each rule asks for its own entry).
    config["datasets"].pop("demo_abdomen_mri")
    config["baseline"]["enabled"] = False
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    env = set_up(folder, tmp_path_factory.mktemp("home"), slurm)
    with open(Path(env["XDG_CONFIG_HOME"]) / "snakemake" / "slurm" / "config.yaml", "a", encoding="utf-8") as profile:
        profile.write(SITE_SETTINGS)
    env, log = recording(env, tmp_path_factory.mktemp("bin"), slurm_work)
    return folder, env, log


def _check_submissions(found: list[tuple[str, list[str]]], rules: set[str]) -> None:
    assert {rule for rule, _ in found} == rules, f"submitted: {sorted({rule for rule, _ in found})}"
    for rule, arguments in found:
        assert requested(arguments) == EXPECTED[rule], f"{rule}: {arguments}"


def test_profile_slurm_lora_finetune_submits_each_job_with_its_resources(checkout) -> None:
    folder, env, log = checkout
    result = typed(env, folder, "snakemake --profile slurm lora_finetune")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    found = submissions(log)
    # The downloads ran here, on the host (compute nodes of most sites have no internet).
    _check_submissions(found, {"preprocess", "cache_prompts", "universal_pretrain", "lora_center"})
    assert [rule for rule, _ in found].count("preprocess") == 2
    assert (folder / "data" / "raw" / "demo_abdomen_ct" / "download.json").is_file()
    assert (folder / "results" / "lora" / "ct_siteB" / "metrics.json").is_file()


def test_profile_slurm_all_submits_the_remaining_jobs_with_their_resources(checkout) -> None:
    folder, env, log = checkout
    log.unlink(missing_ok=True)
    result = typed(env, folder, "snakemake --profile slurm all")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    found = submissions(log)
    _check_submissions(found, {"evaluate", "prognosis", "report"})
    assert (folder / "results" / "report" / "index.html").is_file()


def test_plain_snakemake_lora_finetune_runs_here_without_sbatch(checkout) -> None:
    folder, env, log = checkout
    log.unlink(missing_ok=True)
    shutil.rmtree(folder / "results" / "lora")
    result = typed(env, folder, "snakemake lora_finetune")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "Provided cores: " in output  # profiles/default's `cores: all`: the local executor
    assert submissions(log) == []
    assert (folder / "results" / "lora" / "ct_siteB" / "metrics.json").is_file()


def _site_home(tmp_path: Path, env: dict, profile: str) -> dict:
    """A home whose ~/.config/snakemake/slurm is the site's own profile (nothing about this workflow)."""
    site = tmp_path / "home" / ".config" / "snakemake" / "slurm"
    site.mkdir(parents=True)
    (site / "config.yaml").write_text(profile, encoding="utf-8")
    return dict(env, HOME=str(tmp_path / "home"), XDG_CONFIG_HOME=str(tmp_path / "home" / ".config"))


SITE_PROFILE = "executor: slurm\njobs: 10\n" + SITE_SETTINGS


def test_site_profile_of_its_own_gets_the_workflows_resources(checkout, tmp_path: Path) -> None:
    folder, env, log = checkout
    log.unlink(missing_ok=True)
    env = _site_home(tmp_path, env, SITE_PROFILE)
    kept = subprocess.run(["make", "--no-print-directory", "slurm-profile"], cwd=folder, env=env, capture_output=True,
                          text=True)
    assert "keeping" in kept.stdout, kept.stdout + kept.stderr
    assert (Path(env["XDG_CONFIG_HOME"]) / "snakemake" / "slurm" / "config.yaml").read_text() == SITE_PROFILE
    result = typed(env, folder, "snakemake --profile slurm --forcerun lora_center lora_finetune")
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    # The report follows the LoRA metrics the local run of the test above rewrote.
    _check_submissions(submissions(log), {"lora_center", "report"})


def test_site_profile_that_takes_the_stop_signal_stops_before_any_sbatch(checkout, tmp_path: Path) -> None:
    folder, env, log = checkout
    log.unlink(missing_ok=True)
    env = _site_home(tmp_path, env, SITE_PROFILE + "set-resources:\n  lora_center:\n    slurm_extra: \"'--qos=normal'\"\n")
    result = typed(env, folder, "snakemake --profile slurm --forcerun lora_center lora_finetune")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-4000:]
    stop = [line for line in output.splitlines() if line.startswith("Stopped before submitting")]
    assert stop and "lora_center" in stop[0] and "--signal=TERM@120" in stop[0], output[-4000:]
    assert submissions(log) == []


def _readme_snakemake_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"(?ms)^```[a-z]*\n(.*?)^```", text):
        for line in block.splitlines():
            command = line.split(" #")[0].strip()
            if re.match(r"^(\.venv/bin/)?snakemake\b", command):
                commands.append(command)
    return commands


def test_readme_snakemake_commands_parse_and_dry_run(tmp_path_factory, slurm) -> None:
    commands = _readme_snakemake_commands()
    assert any(command.startswith("snakemake --profile slurm all") for command in commands)
    folder = fresh_checkout(tmp_path_factory.mktemp("readme"))
    env = set_up(folder, tmp_path_factory.mktemp("readme-home"), slurm)
    failed = []
    for command in commands:
        words = shlex.split(command)
        words[0] = "snakemake"  # the venv's, first on PATH
        # -n right after the program: --configfile would take any later word as a file.
        result = typed(env, folder, shlex.join([words[0], "-n", *words[1:]]), limit_s=300)
        output = result.stdout + result.stderr
        # --report reads a finished run's results: on a fresh checkout it loads, then finds none.
        nothing_to_report = "--report" in words and "marked for report but does not exist" in output
        if result.returncode != 0 and not nothing_to_report:
            failed.append(f"{command}: {output[-1500:]}")
    assert not failed, "\n\n".join(failed)
