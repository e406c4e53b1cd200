"""What produced a report: config hash, code version and commit, data and metrics hashes, machine.

Written as provenance.json beside the report; holds no timestamps, so an unchanged run rewrites it byte for byte.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Mapping

import duplus
from duplus.atomic import write_json
from duplus.hashing import sha256_file, sha256_text
from duplus.results_layout import ResultsLayout
from duplus.settings import Settings

PACKAGES = ("monai", "torch", "transformers", "peft", "snakemake", "scikit-survival", "SimpleITK",
            "numpy", "pandas", "scikit-learn", "matplotlib", "safetensors")


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 of the config as canonical JSON (sorted keys, no whitespace)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return sha256_text(text)


def git_commit(folder: str | Path | None = None) -> dict[str, Any]:
    """Commit checked out in ``folder`` (default: working directory) and whether tracked files changed."""
    cwd = str(folder) if folder is not None else None

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, encoding="utf-8", errors="replace",
                                  timeout=20, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {"commit": "unknown", "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def manifest_hashes(config: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """sha256 of each configured dataset's preprocessed manifest.csv that exists."""
    root = Path(Settings.of(config).paths.preprocessed)
    found = {}
    for dataset in sorted(config.get("datasets", {}) or {}):
        path = root / dataset / "manifest.csv"
        if path.is_file():
            found[dataset] = {"path": str(path), "sha256": sha256_file(path)}
    return found


def file_hashes(paths: Iterable[Path], relative_to: Path) -> dict[str, str]:
    """{path relative to ``relative_to``: sha256} for each existing file."""
    found = {}
    for path in sorted(set(Path(p) for p in paths)):
        if path.is_file():
            try:
                name = str(path.relative_to(relative_to))
            except ValueError:
                name = str(path)
            found[name] = sha256_file(path)
    return found


def hardware() -> dict[str, Any]:
    """The machine the report (not the training) ran on; torch is not imported for this."""
    try:
        memory_mb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20)
    except (ValueError, OSError, AttributeError):
        memory_mb = None
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "memory_mb": memory_mb,
    }


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each package (None if not installed), read from metadata, not by import."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def collect_provenance(config: Mapping[str, Any], results_dir: str | Path, inputs: Iterable[Path] = (),
                       device: str | None = None) -> dict[str, Any]:
    """Everything needed to tell which code, config, data and machine produced the metrics."""
    results = Path(results_dir)
    layout = ResultsLayout(results)
    extra = [layout.model_sidecar, *sorted(layout.prompts.glob("*.json"))]
    return {
        "duplus_version": duplus.__version__,
        "git": git_commit(),
        "config_sha256": config_hash(config),
        "seed": Settings.of(config).seed,
        "data_manifests": manifest_hashes(config),
        "metrics_files": file_hashes([*inputs, *extra], results),
        "evaluation_device": device,
        "hardware": hardware(),
        "packages": package_versions(),
    }


def write_provenance(path: str | Path, provenance: Mapping[str, Any]) -> Path:
    """Write ``provenance`` as sorted JSON, atomically."""
    write_json(path, dict(provenance))
    return Path(path)
