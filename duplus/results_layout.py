"""Where each stage's results lie under the results folder: one map, read by the rules (their
outputs and inputs), the report (what it reads and hashes) and ``duplus segment`` (a run's weights).

A rule's output given with a wildcard (``"{dataset}"``, ``"{center}"``) is the same call with the
wildcard's pattern as the argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PROGNOSIS_FILES = ("summary.csv", "folds.csv", "km.json", "auc.csv", "calibration.json", "cohort.json")
"""What the prognosis stage writes for the report, each of its rule's outputs."""


@dataclass(frozen=True)
class ResultsLayout:
    """The paths of one results folder (``paths.results`` in the config)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))  # a str from the config is welcome

    # Prompt-embedding cache (one per text encoder) and what it was built from.
    @property
    def prompts(self) -> Path:
        return self.root / "prompts"

    def prompt_cache(self, encoder: str) -> Path:
        return self.prompts / f"{encoder}.safetensors"

    def prompt_manifest(self, encoder: str) -> Path:
        return self.prompts / f"{encoder}.json"

    # Universal pretraining.
    @property
    def pretrain(self) -> Path:
        return self.root / "pretrain"

    @property
    def model(self) -> Path:
        return self.pretrain / "model.safetensors"

    @property
    def model_sidecar(self) -> Path:
        """``model.json`` beside the weights (config, encoder, classes, sha256)."""
        return self.pretrain / "model.json"

    @property
    def train_log(self) -> Path:
        return self.pretrain / "train_log.csv"

    # Task-specific baselines, one network per dataset.
    def baseline(self, dataset: str) -> Path:
        return self.root / "baseline" / dataset

    # Evaluation of the universal network and of the baselines.
    def universal_evaluation(self, name: str = "") -> Path:
        return self.root / "evaluate" / "universal" / name

    def baseline_evaluation(self, name: str = "") -> Path:
        return self.root / "evaluate" / "baseline" / name

    # Per-center LoRA: metrics.json, the peft adapter folder, adapter_meta.json.
    def lora_center(self, center: str) -> Path:
        return self.root / "lora" / center

    @property
    def lora(self) -> Path:
        return self.root / "lora"

    # Prognosis and the report.
    def prognosis(self, name: str = "") -> Path:
        return self.root / "prognosis" / name

    def report(self, name: str = "") -> Path:
        return self.root / "report" / name
