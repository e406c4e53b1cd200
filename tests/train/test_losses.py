"""Masked Dice + BCE: only supervised classes carry loss and gradient."""

from __future__ import annotations

import pytest
import torch

from duplus.train.losses import masked_loss, per_class_loss


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, 8, 8, 8, generator=g, requires_grad=True)
    target = (torch.rand(2, 3, 8, 8, 8, generator=g) > 0.7).float()
    return logits, target


def test_unsupervised_class_gets_zero_gradient():
    logits, target = _inputs()
    weight = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    masked_loss(logits, target, weight).backward()
    grad = logits.grad
    assert torch.all(grad[0, 2] == 0) and torch.all(grad[1, 1:] == 0)
    assert grad[0, :2].abs().sum() > 0 and grad[1, 0].abs().sum() > 0


def test_loss_is_mean_over_supervised_classes_only():
    logits, target = _inputs(1)
    per = per_class_loss(logits, target)
    weight = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    expected = (per[0, 0] + per[0, 2] + per[1, 2]) / 3
    assert torch.allclose(masked_loss(logits, target, weight), expected)
    # Changing the logits of an unsupervised class does not change the loss.
    other = logits.detach().clone()
    other[1, 0] += 5.0
    assert torch.equal(masked_loss(other, target, weight), masked_loss(logits.detach(), target, weight))


def test_non_finite_loss_of_padding_class_does_not_leak():
    logits, target = _inputs(2)
    logits = logits.detach().clone()
    logits[0, 2] = float("nan")
    logits.requires_grad_(True)
    weight = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    loss = masked_loss(logits, target, weight)
    assert torch.isfinite(loss)
    loss.backward()
    # Nothing of the NaN class flows back: its logits get a zero gradient, the others a finite one.
    assert torch.isfinite(logits.grad).all()
    assert torch.all(logits.grad[0, 2] == 0) and logits.grad[0, :2].abs().sum() > 0


def test_loss_decreases_towards_perfect_prediction():
    _, target = _inputs(3)
    weight = torch.ones(2, 3)
    good = masked_loss((target * 2 - 1) * 8, target, weight)
    bad = masked_loss((1 - target * 2) * 8, target, weight)
    assert good < 0.05 < 1.0 < bad


def test_no_supervised_class_gives_zero_loss():
    logits, target = _inputs(4)
    loss = masked_loss(logits, target, torch.zeros(2, 3))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logits.grad == 0)


def test_absent_class_is_held_down_by_bce_only():
    """A class absent from the patch adds no Dice term (which would swamp the present classes)."""
    logits = torch.zeros(1, 2, 8, 8, 8, requires_grad=True)
    target = torch.zeros(1, 2, 8, 8, 8)
    target[0, 0, 2:5, 2:5, 2:5] = 1
    per = per_class_loss(logits, target)
    bce_at_half = torch.log(torch.tensor(2.0)).item()
    assert per[0, 1].item() == pytest.approx(0.5 * bce_at_half, rel=1e-5)
    assert per[0, 0].item() > 0.5 * bce_at_half + 0.5  # the present class keeps its Dice term
    masked_loss(logits, target, torch.ones(1, 2)).backward()
    absent, present = logits.grad[0, 1], logits.grad[0, 0][target[0, 0] > 0]
    # Per voxel, the absent class is pushed down no harder than the present class is pulled up.
    assert absent.abs().max() <= present.abs().mean()
