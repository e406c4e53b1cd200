"""Segmentation loss: Dice + 0.5 * BCE per class, only on the classes a sample supervises.

Weight-0 classes (padding, classes the dataset does not annotate) give neither loss nor gradient.
The Dice term counts only for classes present in the patch: for an absent class, a smoothed Dice
pushes every voxel towards 0 about a thousand times harder than a present class's Dice pulls its
voxels up, and the network learns never to predict small organs. BCE, balanced per voxel, is what
keeps absent classes at zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

BCE_WEIGHT = 0.5

_dice = DiceLoss(sigmoid=True, reduction="none", smooth_nr=1.0, smooth_dr=1.0)


def per_class_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice (classes present in the patch) + 0.5 * BCE of every (sample, class): ``[B, K, *spatial]`` -> ``[B, K]``."""
    logits = logits.float()  # reductions over 10^6 voxels lose too much in bf16
    target = target.float()
    dice = _dice(logits, target).reshape(logits.shape[0], logits.shape[1])
    present = target.flatten(2).amax(dim=2) > 0
    dice = torch.where(present, dice, torch.zeros_like(dice))
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(2).mean(dim=2)
    return dice + BCE_WEIGHT * bce


def masked_loss(
    logits: torch.Tensor, target: torch.Tensor, class_weight: torch.Tensor, weight_total: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean per-class loss over supervised classes (``class_weight > 0``); a 0-dim tensor.

    ``weight_total`` replaces this batch's sum of class weights as the divisor: data-parallel
    ranks pass the global sum (times the number of ranks), so the gradients DDP averages are those
    of one process holding the whole batch.

    Unsupervised classes' logits are replaced (``torch.where``, not a product) before the loss, so
    even non-finite logits of such a class (a padding prompt overflowing in bf16, say) reach neither
    the result nor the gradient: a ``where`` after the loss alone would still send 0 * NaN back
    through those logits into the shared weights. No host synchronisation.
    """
    if logits.shape != target.shape or class_weight.shape != logits.shape[:2]:
        raise ValueError(
            f"loss shapes disagree: logits {tuple(logits.shape)}, target {tuple(target.shape)}, "
            f"class_weight {tuple(class_weight.shape)}"
        )
    supervised = class_weight > 0
    voxel_mask = supervised.reshape(*supervised.shape, *([1] * (logits.dim() - 2)))
    logits = torch.where(voxel_mask, logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
    losses = per_class_loss(logits, target)
    weight = class_weight.to(losses.dtype)
    weighted = torch.where(supervised, losses * weight, torch.zeros_like(losses))
    total = weight.sum() if weight_total is None else weight_total.to(weighted.dtype)
    return weighted.sum() / total.clamp_min(1e-6)
