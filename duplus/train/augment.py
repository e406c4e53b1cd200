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


# Array axes of a preprocessed patch are (Z, Y, X) in the canonical orientation; X is left-right.
LEFT_RIGHT_AXIS = 2


def has_lateral_classes(classes: Sequence[str]) -> bool:
    """True when a class name says left or right (left kidney, right lung, ...)."""
    words = {word for name in classes for word in str(name).lower().replace("_", " ").split()}
    return bool(words & {"left", "right"})


def build_augmentation(modality: str, patch_size: Sequence[int], lateral: bool = False) -> Compose:
    """Random flips, axial 90-degree rotations (square axial patches only) and intensity changes.

    ``lateral``: the dataset has left/right classes. A left-right mirror, or an axial rotation
    (180 degrees is a mirror of both in-plane axes), would then show a left kidney labelled as the
    right one, so those are left out and only the other two axes are mirrored.
    """
    keys = ["image", "target"]
    params = INTENSITY.get(modality, INTENSITY["MRI"])
    axes = [axis for axis in range(3) if not (lateral and axis == LEFT_RIGHT_AXIS)]
    transforms = [RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in axes]
    if patch_size[1] == patch_size[2] and not lateral:
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
    """Apply ``transform`` with its random state set from ``seed`` (so the result is a pure function).

    The target keeps its dtype (uint8 masks stay uint8); the image comes back float32.
    """
    transform.set_random_state(seed=int(seed))
    out = transform({"image": image, "target": target})
    return _plain(out["image"]).float(), _plain(out["target"]).to(target.dtype)
