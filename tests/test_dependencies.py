"""envs/duplus.yaml (conda jobs) states the same requirements as pyproject.toml, word for word."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
# The Snakemake that starts the jobs provides its own module to each job's script.
NOT_IN_JOB_ENVIRONMENT = {"snakemake"}


def _requirements(lines) -> dict[str, str]:
    parsed = [Requirement(line) for line in lines]
    return {requirement.name.lower(): str(requirement.specifier) for requirement in parsed}


def test_conda_environment_states_the_versions_of_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    environment = yaml.safe_load((ROOT / "envs" / "duplus.yaml").read_text(encoding="utf-8"))
    pip = next(entry["pip"] for entry in environment["dependencies"] if isinstance(entry, dict) and "pip" in entry)
    expected = {name: spec for name, spec in _requirements(project).items() if name not in NOT_IN_JOB_ENVIRONMENT}
    assert _requirements(pip) == expected


def test_the_lowest_torch_declared_has_what_training_uses() -> None:
    # torch.amp.GradScaler (duplus/train/step.py) appeared in torch 2.3.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    torch = next(Requirement(line) for line in project if Requirement(line).name == "torch")
    assert not torch.specifier.contains("2.2.2") and torch.specifier.contains("2.3.0")
