"""What each phase of a per-center adaptation job depends on: the keys of its resume journal.

Zero-shot scores depend on the base weights, the center's test data, the evaluation settings, the
prompts, the device and the code; LoRA training adds its own settings and the train data; full
fine-tuning adds only its step budget and learning rate. Data enter by content (sha256 of the
preprocessed arrays, their preprocessing record and the original labels scores are computed
against), never by absolute path, so a corrected label is noticed and a moved project resumes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from duplus.data.manifest import CaseRecord
from duplus.hashing import package_source_sha256, sha256_file, sha256_text
from duplus.settings import Settings
from duplus.tracked import results_only, stage_settings
from duplus.train.cases import preprocessed_sha256

# Adaptation settings the LoRA phase's key holds elsewhere (steps and batch size are shared by both
# trainings) or that are not its own (which center, full fine-tuning's rate, whether the stage runs).
_NOT_LORA_PHASE = ("enabled", "centers", "full_finetune_lr", "steps", "batch_size")


def _file(path: Path | None) -> str | None:
    return sha256_file(path) if path is not None and path.is_file() else None


def train_data_sha256(cases: Iterable[CaseRecord]) -> str:
    """The training cases by content: arrays, label maps and preprocessing records."""
    cases = sorted(cases, key=lambda c: (c.dataset, c.case))
    arrays = [[c.dataset, c.case, _file(Path(c.image)), _file(Path(c.label))] for c in cases]
    return sha256_text(json.dumps([preprocessed_sha256(cases), arrays]))


def test_data_sha256(cases: Iterable[CaseRecord]) -> str:
    """The scored cases by content: what the manifest says of them (not where their files are) and the
    files scoring reads (preprocessed image, its preprocessing record, the original label)."""
    described, files = [], []
    for case in cases:
        described.append([case.dataset, case.case, case.center, case.modality, case.sequence, case.region, case.split,
                          list(case.shape), sorted(case.label_map.items())])
        files.append([_file(case.image), _file(case.meta), _file(case.raw_label)])
    return sha256_text(json.dumps([described, files]))


def lora_phase_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``lora`` settings only the LoRA phase depends on (rank, alpha, targets, rate, ...)."""
    return {k: v for k, v in results_only("lora", config.get("lora")).items() if k not in _NOT_LORA_PHASE}


def phase_identities(config: Mapping[str, Any], *, center: tuple[str, ...], base_sha256: str,
                     train_cases: list[CaseRecord], test_cases: list[CaseRecord], cache: Any,
                     amp: torch.dtype | None, device: torch.device) -> dict[str, dict[str, Any]]:
    """Identity of the ``zero_shot``, ``lora`` and ``full_ft`` phases (``config``: the job's, with the base's window).

    ``center``: the center's datasets and its manifest center value; ``test_cases``: its test cases in
    every one of those datasets.
    """
    settings = dict(config.get("lora") or {})
    pretrain = config.get("pretrain") or {}
    scoring = {
        "base_sha256": base_sha256,
        "center": list(center),
        "evaluation": stage_settings("evaluate", config),
        "test_data": test_data_sha256(test_cases),
        "prompt_cache": str(getattr(cache, "encoder_identity", "")),
        "device": device.type,
        "source": package_source_sha256(),
    }
    training = {
        **scoring,
        "seed": Settings.of(config).seed,
        "precision": str(amp),
        "sampling": [pretrain.get("patch_size"), pretrain.get("foreground_ratio"),
                     Settings.of(config).prompts.paraphrases],
        "train_data": train_data_sha256(train_cases),
        "steps": settings.get("steps"),
        "batch_size": settings.get("batch_size"),
    }
    return {
        "zero_shot": scoring,
        "lora": {**training, "lora": lora_phase_settings(config)},
        "full_ft": {**training, "full_finetune_lr": settings.get("full_finetune_lr")},
    }
