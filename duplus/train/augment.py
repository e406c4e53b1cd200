"""Patch augmentation with MONAI dictionary transforms, per modality, seeded per sample.

Spatial transforms act on image and targets alike; intensity transforms on the image only.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from monai.transforms import (
    Compose,
    RandFlipd,
    RandGaussianNoised,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
)

# Intensity ranges per modality (inputs are z-scored): CT intensities are calibrated (HU), so
# they move least; MRI intensity scales differ most between scanners and sequences; PET uptake
# scales with dose and timing and PET images are noisy.
INTENSITY = {
    "CT": {"scale": 0.1, "shift": 0.1, "noise_prob": 0.15, "noise_std": 0.05},
    "MRI": {"scale": 0.25, "shift": 0.2, "noise_prob": 0.2, "noise_std": 0.1},
    "PET": {"scale": 0.25, "shift": 0.05, "noise_prob": 0.2, "noise_std": 0.1},
}


def build_augmentation(modality: str, patch_size: Sequence[int]) -> Compose:
    """Random flips, axial 90-degree rotations (square axial patches only) and intensity changes."""
    keys = ["image", "target"]
    params = INTENSITY.get(modality, INTENSITY["MRI"])
    transforms = [RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(3)]
    if patch_size[1] == patch_size[2]:
        # Rotating a non-square axial plane would change the patch shape.
        transforms.append(RandRotate90d(keys, prob=0.5, max_k=3, spatial_axes=(1, 2)))
    transforms += [
        RandScaleIntensityd("image", factors=params["scale"], prob=0.3),
        RandShiftIntensityd("image", offsets=params["shift"], prob=0.3),
        RandGaussianNoised("image", prob=params["noise_prob"], mean=0.0, std=params["noise_std"]),
    ]
    return Compose(transforms)


def _plain(value: torch.Tensor | np.ndarray) -> torch.Tensor:
    # MONAI returns MetaTensors; training wants plain, contiguous tensors (cheaper to collate/pin).
    if hasattr(value, "as_tensor"):
        value = value.as_tensor()
    return torch.as_tensor(value).contiguous()


def augment(
    transform: Compose, image: torch.Tensor, target: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``transform`` with its random state set from ``seed`` (so the result is a pure function)."""
    transform.set_random_state(seed=int(seed))
    out = transform({"image": image, "target": target})
    return _plain(out["image"]).float(), _plain(out["target"]).float()
