"""Image features per patient from the pretrained DuPLUS model: bottleneck GAP over the image, the
bottleneck mean over the tumour, log tumour volume; cached per case and keyed by the model's hash.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from duplus.atomic import save_npy
from duplus.errors import DataError
from duplus.hashing import sha256_file, sha256_text
from duplus.journal import Journal, journal_key
from duplus.progress import progress

log = logging.getLogger(__name__)

FEATURE_VERSION = 1   # bump when the feature definition changes: old caches are then recomputed
MASK_SOURCES = ("predicted", "label")


@dataclass(frozen=True)
class FeatureSettings:
    """How features are computed.

    mask_source: "predicted" (the model's own tumour prediction: union of the target prompts'
        sigmoid > threshold) or "label" (the ground-truth label's tumour ids).
    tumour_labels: label ids counted as tumour when mask_source is "label" (empty: every id > 0).
    voxel_ml: volume of one preprocessed voxel in ml (spacing product / 1000).
    divisor: the padded shape is a multiple of it (2**downsamplings); None reads it off the model.
    patch_size: the padded shape is at least this (the window the model was trained on).
    """

    mask_source: str = "predicted"
    threshold: float = 0.5
    tumour_labels: tuple[int, ...] = ()
    voxel_ml: float = 1e-3
    divisor: int | None = None
    patch_size: tuple[int, int, int] | None = None

    def key(self) -> dict[str, Any]:
        return {"mask_source": self.mask_source, "threshold": self.threshold,
                "tumour_labels": list(self.tumour_labels), "voxel_ml": self.voxel_ml,
                "divisor": self.divisor, "patch_size": list(self.patch_size or []), "version": FEATURE_VERSION}


@dataclass
class CaseInput:
    """One case for feature extraction: preprocessed arrays and its prompt embeddings."""

    case: str
    image_path: Path
    label_path: Path | None
    modality: str                # the case's modality name (the network maps it to its stem)
    context: torch.Tensor        # T1 embedding (T,)
    targets: torch.Tensor        # T2 embeddings of the tumour classes (K, T)


def feature_names(channels: int) -> list[str]:
    return ([f"gap_{i}" for i in range(channels)] + [f"tumour_{i}" for i in range(channels)]
            + ["log_tumour_ml"])


def size_divisor(model: Any, default: int = 32) -> int:
    """2**(number of downsamplings) of the model, read from common attributes, else ``default``."""
    for owner in (model, getattr(model, "cfg", None), getattr(model, "config", None)):
        if owner is None:
            continue
        for name in ("size_divisor", "downsample_factor"):
            value = getattr(owner, name, None)
            if isinstance(value, int) and value > 0:
                return value
        channels = getattr(owner, "channels", None)
        if isinstance(channels, (list, tuple)) and len(channels) > 1:
            return 2 ** (len(channels) - 1)
    return default


def padded_shape(shape: Sequence[int], divisor: int, patch_size: Sequence[int] | None) -> tuple[int, ...]:
    minimum = patch_size or (1,) * len(shape)
    return tuple(int(math.ceil(max(s, p) / divisor) * divisor) for s, p in zip(shape, minimum))


@torch.no_grad()
def case_features(model: Any, image: np.ndarray, modality: int | str, context: torch.Tensor,
                  targets: torch.Tensor, settings: FeatureSettings, label: np.ndarray | None = None,
                  device: str | torch.device = "cpu") -> tuple[np.ndarray, float]:
    """Features of one preprocessed image (Z, Y, X): (vector of 2C + 1, tumour volume in ml).

    The image is padded at its far end to the model's size divisor (and at least the patch size)
    with its minimum (background); pooling weights are the fractions of each bottleneck cell that
    lie inside the original image (GAP) or the tumour mask (tumour mean), so cells made mostly of
    padding count little. An empty tumour mask gives the GAP as tumour feature and volume 0.
    """
    if settings.mask_source not in MASK_SOURCES:
        raise ValueError(f"mask_source must be one of {MASK_SOURCES}, got {settings.mask_source!r}")
    if image.ndim != 3:
        raise DataError(f"prognosis features: image must be 3-D (Z, Y, X), got shape {image.shape}")
    divisor = settings.divisor or size_divisor(model)
    shape = padded_shape(image.shape, divisor, settings.patch_size)
    pad = [(0, p - s) for s, p in zip(image.shape, shape)]
    padded = np.pad(image.astype(np.float32), pad, constant_values=float(np.min(image)))
    x = torch.from_numpy(padded)[None, None].to(device)
    if isinstance(modality, str):
        from duplus.model import modalities_of, modality_index

        modality = modality_index(modality, modalities_of(model))
    mod = torch.tensor([modality], dtype=torch.long, device=device)
    ctx = context.reshape(1, -1).to(device, torch.float32)

    if settings.mask_source == "label":
        if label is None:
            raise DataError("prognosis features: mask_source 'label' needs the case's label.npy")
        if label.shape != image.shape:
            raise DataError(f"prognosis features: label shape {label.shape} != image shape {image.shape}")
        ids = settings.tumour_labels
        mask = np.isin(label, ids) if ids else label > 0
    else:
        logits = model(x, mod, ctx, targets.reshape(1, targets.shape[0], -1).to(device, torch.float32))
        logits = logits[0, :, : image.shape[0], : image.shape[1], : image.shape[2]]
        mask = (torch.sigmoid(logits.float()) > settings.threshold).any(dim=0).cpu().numpy()

    bottleneck = model.encode(x, mod, ctx)[0].float()                       # (C, z, y, x)
    grid = tuple(bottleneck.shape[1:])
    valid = np.zeros(shape, dtype=np.float32)
    valid[: image.shape[0], : image.shape[1], : image.shape[2]] = 1.0
    tumour = np.pad(mask.astype(np.float32), pad)
    gap = _weighted_mean(bottleneck, _cell_fractions(valid, grid, device))
    weights = _cell_fractions(tumour, grid, device)
    tumour_mean = _weighted_mean(bottleneck, weights) if float(weights.sum()) > 0 else gap
    volume_ml = float(mask.sum()) * settings.voxel_ml
    vector = torch.cat([gap, tumour_mean, torch.tensor([math.log1p(volume_ml)], device=gap.device)])
    return vector.cpu().numpy().astype(np.float32), volume_ml


def _cell_fractions(mask: np.ndarray, grid: tuple[int, ...], device: str | torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None].to(device)
    return F.adaptive_avg_pool3d(tensor, grid)[0, 0]


def _weighted_mean(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    total = weights.sum().clamp_min(1e-12)
    return (features * weights[None]).flatten(1).sum(dim=1) / total


def extract_features(model: Any, cases: Sequence[CaseInput], out_dir: str | Path, model_key: str,
                     settings: FeatureSettings, device: str | torch.device = "cpu",
                     subfolder: str | None = None) -> dict[str, np.ndarray]:
    """Features of every case, from ``out_dir/features/{case}.npy`` when still valid, else computed.

    ``subfolder`` (the dataset's name) keeps apart cases of several datasets that share ids (one
    patient's CT and PET): ``out_dir/features/{subfolder}/{case}.npy``.

    A cached file is valid when its record ``{case}.json`` (``duplus.journal``) holds the same key,
    of the model's sha256 (``model_key``; pass the adapter's hash too for an adapted model), the
    settings and the image (and label) file hashes, and the array's sha256 as it was written. The
    array is written before its record, both atomically, so an interrupted run leaves either a valid
    pair or one that is recomputed, never an earlier run's record vouching for a later run's array.

    Args:
        model: DuPLUS-like object with ``encode`` and ``__call__`` (a LoRA-adapted model works).
    """
    folder = Path(out_dir) / "features" / (subfolder or "")
    cache = Journal(folder)  # a cache that stays: never cleared, each record replaced when stale
    results: dict[str, np.ndarray] = {}
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    computed = 0
    try:
        for case in progress(cases, desc="prognosis features", total=len(cases)):
            _require(case.image_path, case.case, "image")
            if settings.mask_source == "label":
                _require(case.label_path, case.case, "label")
            key = _case_key(case, model_key, settings)
            array_path = folder / f"{case.case}.npy"
            cached = _read_cached(cache, case.case, array_path, key)
            if cached is not None:
                results[case.case] = cached
                continue
            image = _load(case.image_path, case.case, "image")
            label = _load(case.label_path, case.case, "label") if settings.mask_source == "label" else None
            vector, volume_ml = case_features(model, image, case.modality, case.context, case.targets,
                                              settings, label=label, device=device)
            save_npy(array_path, vector)
            cache.save(case.case, key, {"model_sha256": model_key, "tumour_ml": volume_ml,
                                        "mask_source": settings.mask_source}, files=[array_path.name])
            results[case.case] = vector
            computed += 1
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    log.info("prognosis features: %d computed, %d from cache in %s", computed, len(cases) - computed, folder)
    return results


def _case_key(case: CaseInput, model_key: str, settings: FeatureSettings) -> str:
    parts = {"model": model_key, "settings": settings.key(), "image": sha256_file(case.image_path),
             "modality": case.modality,
             "prompts": sha256_text(json.dumps([case.context.tolist(), case.targets.tolist()]))}
    if settings.mask_source == "label":
        parts["label"] = sha256_file(case.label_path)
    return journal_key(parts)


def _read_cached(cache: Journal, case: str, array_path: Path, key: str) -> np.ndarray | None:
    if cache.load(case, key) is None:
        return None  # absent, stale, or the array is not the one its record was written with
    try:
        return np.load(array_path, allow_pickle=False)
    except (OSError, ValueError):
        return None     # unreadable cache entry: recompute rather than fail


def _require(path: Path | None, case: str, what: str) -> None:
    if path is None or not Path(path).is_file():
        raise DataError(f"prognosis features: case {case}: {what} file {path} does not exist "
                        f"(rerun the preprocess stage)")


def _load(path: Path | None, case: str, what: str) -> np.ndarray:
    _require(path, case, what)
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DataError(f"prognosis features: case {case}: cannot read {what} file {path}: {error}") from error
