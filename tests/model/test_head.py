"""The dynamic head without autograd (biases folded into reused matmul buffers) against the training path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import duplus.model.head as head_module


def _per_class_convolutions(features: torch.Tensor, params: torch.Tensor, head: head_module.DynamicHead) -> torch.Tensor:
    """The head's definition, class by class, as three 1x1x1 ``conv3d`` (independent of either path)."""
    c = head.channels
    out = []
    for b in range(features.shape[0]):
        per_class = []
        for cls in range(params.shape[1]):
            w1, w2, w3, b1, b2, b3 = params[b, cls].split(head.splits)
            h = F.relu(F.conv3d(features[b : b + 1], w1.reshape(c, c, 1, 1, 1), b1))
            h = F.relu(F.conv3d(h, w2.reshape(c, c, 1, 1, 1), b2))
            per_class.append(F.conv3d(h, w3.reshape(1, c, 1, 1, 1), b3)[0, 0])
        out.append(torch.stack(per_class))
    return torch.stack(out)


# 1320 voxels per sample: the small budget gives the minimum chunk, 1024 voxels (one full chunk and
# one of 296), the large one a single pass.
@pytest.mark.parametrize("k", [1, 3, 8, 32])
@pytest.mark.parametrize("budget", [1 << 10, 1 << 30])
def test_head_without_autograd_equals_the_training_path_and_the_convolutions(monkeypatch, k, budget):
    monkeypatch.setitem(head_module.HIDDEN_ELEMENTS, "cpu", budget)
    head = head_module.DynamicHead(8)
    generator = torch.Generator().manual_seed(k)
    features = torch.randn((2, 8, 10, 11, 12), generator=generator)
    params = torch.randn((2, k, sum(head.splits)), generator=generator) * 0.5
    training = head(features, params)  # autograd on: the path training takes
    with torch.no_grad():
        inference = head(features, params)
        expected = _per_class_convolutions(features, params, head)
    assert inference.shape == training.shape == (2, k, 10, 11, 12)
    assert torch.allclose(inference, training.detach(), atol=1e-5, rtol=0)
    assert torch.allclose(inference, expected, atol=1e-5, rtol=0)
    # Masks: equal wherever a logit is clear of float rounding around 0.
    clear = training.detach().abs() > 1e-4
    assert torch.equal((inference > 0)[clear], (training > 0)[clear])


@pytest.mark.parametrize("voxels", [2048, 2049, 3071, 1024 * 3 + 1])
def test_chunk_edges_each_voxel_is_written_once_by_its_own_class(monkeypatch, voxels):
    """Chunks of 1024 voxels with a last one of 0, 1 or 1023 voxels: every logit is filled and in place."""
    monkeypatch.setitem(head_module.HIDDEN_ELEMENTS, "cpu", 1)  # the minimum chunk, 1024 voxels
    head = head_module.DynamicHead(4)
    k = 3
    generator = torch.Generator().manual_seed(voxels)
    features = torch.randn((1, 4, voxels), generator=generator)
    params = torch.randn((1, k, sum(head.splits)), generator=generator)
    with torch.no_grad():
        logits = head(features, params)
        # A chunk left unwritten would show up as garbage from new_empty, a misplaced one as a mismatch.
        expected = _per_class_convolutions(features.reshape(1, 4, voxels, 1, 1), params, head).reshape(1, k, voxels)
    assert torch.isfinite(logits).all()
    assert torch.allclose(logits, expected, atol=1e-5, rtol=0)


def test_training_path_is_unchanged_and_gives_gradients_to_features_and_params():
    head = head_module.DynamicHead(8)
    torch.manual_seed(0)
    features = torch.randn(1, 8, 6, 7, 8, requires_grad=True)
    params = torch.randn(1, 5, sum(head.splits), requires_grad=True)
    logits = head(features, params)
    assert logits.requires_grad
    logits.square().sum().backward()
    assert features.grad is not None and params.grad is not None
    assert features.grad.abs().sum() > 0 and params.grad.abs().sum() > 0


def test_half_precision_features_give_logits_of_their_dtype():
    head = head_module.DynamicHead(8)
    torch.manual_seed(0)
    features, params = torch.randn(1, 8, 4, 5, 6), torch.randn(1, 2, sum(head.splits))
    with torch.no_grad():
        half = head(features.to(torch.bfloat16), params)
        full = head(features, params)
    assert half.dtype == torch.bfloat16
    assert torch.allclose(half.float(), full, atol=0.1 * full.abs().max().item())


def test_other_devices_keep_the_unfolded_head(monkeypatch):
    """The folded path is for CPUs; on the meta device (as on a GPU) the head runs its ``baddbmm`` chunks."""
    head = head_module.DynamicHead(8)
    called = []
    monkeypatch.setattr(head, "_run_folded", lambda *args: called.append(args))
    with torch.no_grad():
        logits = head(torch.empty(1, 8, 4, 4, 4, device="meta"), torch.empty(1, 3, sum(head.splits), device="meta"))
    assert logits.shape == (1, 3, 4, 4, 4) and logits.device.type == "meta" and not called
