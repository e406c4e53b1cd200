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
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd
import torch

from duplus.hashing import package_source_sha256, sha256_file, sha256_text
from duplus.train.cases import CaseRecord, preprocessed_sha256

# Adaptation settings that only the LoRA phase uses; steps and batch size are shared by both trainings.
_NOT_LORA = ("enabled", "centers", "checkpoint_every", "full_finetune_lr", "steps", "batch_size")
# Manifest columns holding absolute paths of the original files: their content counts, not where they are.
_PATH_COLUMNS = ("raw_image", "raw_label")


def _file(path: Path) -> str | None:
    return sha256_file(path) if path.is_file() else None


def train_data_sha256(cases: Iterable[CaseRecord]) -> str:
    """The training cases by content: arrays, label maps and preprocessing records."""
    cases = sorted(cases, key=lambda c: (c.dataset, c.case))
    arrays = [[c.dataset, c.case, _file(Path(c.image)), _file(Path(c.label))] for c in cases]
    return sha256_text(json.dumps([preprocessed_sha256(cases), arrays]))


def test_data_sha256(rows: pd.DataFrame, manifest_dir: Path) -> str:
    """The scored cases by content: manifest rows (minus absolute paths) and the files scoring reads."""
    kept = rows.drop(columns=[c for c in _PATH_COLUMNS if c in rows.columns])
    files = []
    for _, row in rows.iterrows():
        case = [_file(manifest_dir / str(row[c])) for c in ("image", "meta") if c in row]
        if "raw_label" in row:
            case.append(_file(Path(str(row["raw_label"]))))
        files.append(case)
    return sha256_text(json.dumps([kept.to_csv(index=False), files]))


def phase_identities(config: Mapping[str, Any], *, center: tuple[str, ...], base_sha256: str,
                     train_cases: list[CaseRecord], test_sets: Sequence[tuple[pd.DataFrame, Path]], cache: Any,
                     amp: torch.dtype | None, device: torch.device) -> dict[str, dict[str, Any]]:
    """Identity of the ``zero_shot``, ``lora`` and ``full_ft`` phases (``config``: the job's, with the base's window).

    ``center``: the center's datasets and its manifest center value; ``test_sets``: its test rows
    and their manifest's folder, one pair per dataset.
    """
    from duplus.tracked import stage_settings

    settings = dict(config.get("lora") or {})
    pretrain = config.get("pretrain") or {}
    scoring = {
        "base_sha256": base_sha256,
        "center": list(center),
        "evaluation": stage_settings("evaluate", config),
        "test_data": [test_data_sha256(rows, folder) for rows, folder in test_sets],
        "prompt_cache": str(getattr(cache, "encoder_identity", "")),
        "device": device.type,
        "source": package_source_sha256(),
    }
    training = {
        **scoring,
        "seed": int(config.get("seed", 0)),
        "precision": str(amp),
        "sampling": [pretrain.get("patch_size"), pretrain.get("foreground_ratio"),
                     (config.get("prompts") or {}).get("paraphrases", True)],
        "train_data": train_data_sha256(train_cases),
        "steps": settings.get("steps"),
        "batch_size": settings.get("batch_size"),
    }
    return {
        "zero_shot": scoring,
        "lora": {**training, "lora": {k: v for k, v in settings.items() if k not in _NOT_LORA}},
        "full_ft": {**training, "full_finetune_lr": settings.get("full_finetune_lr")},
    }
