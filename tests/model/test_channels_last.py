"""Channels-last (NDHWC) layout: same numbers as the default layout, and no layout flips inside."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from duplus.model import DuPLUS, ModelConfig, use_channels_last
from duplus.model.backbone import InstanceNorm3dKeepLayout

CL = torch.channels_last_3d


def test_norm_matches_native_instance_norm_and_keeps_layout():
    torch.manual_seed(0)
    ours, native = InstanceNorm3dKeepLayout(6, affine=True), nn.InstanceNorm3d(6, affine=True)
    with torch.no_grad():
        for module in (ours, native):
            module.weight.copy_(torch.linspace(0.5, 2.0, 6))
            module.bias.copy_(torch.linspace(-1.0, 1.0, 6))
    x = (torch.randn(2, 6, 5, 7, 9) * 3 + 1).contiguous(memory_format=CL).requires_grad_()
    y = ours(x)
    assert y.is_contiguous(memory_format=CL) and not y.is_contiguous()
    expected = native(x.detach().contiguous().requires_grad_())
    assert torch.allclose(y, expected, atol=1e-5)
    # Gradients through the layout-preserving path equal the native kernel's.
    x_native = x.detach().contiguous().requires_grad_()
    y.pow(2).sum().backward()
    native(x_native).pow(2).sum().backward()
    assert torch.allclose(x.grad, x_native.grad, atol=1e-4)
    assert torch.allclose(ours.weight.grad, native.weight.grad, rtol=1e-4, atol=1e-4)
    # A default-layout input still takes the native kernel (and its layout).
    assert ours(torch.randn(2, 6, 5, 7, 9)).is_contiguous()


def test_norm_in_bf16_returns_bf16_close_to_float32():
    torch.manual_seed(1)
    norm = InstanceNorm3dKeepLayout(4, affine=True)
    x = torch.randn(1, 4, 6, 6, 6).contiguous(memory_format=CL)
    low = norm(x.bfloat16())
    assert low.dtype == torch.bfloat16 and low.is_contiguous(memory_format=CL)
    assert torch.allclose(low.float(), norm(x), atol=0.05)


def _inputs(cfg: ModelConfig, patch: int = 32):
    g = torch.Generator().manual_seed(2)
    image = torch.randn(2, 1, patch, patch, patch, generator=g)
    modality = torch.tensor([0, 1])
    context = torch.randn(2, cfg.text_dim, generator=g)
    targets = torch.randn(2, 3, cfg.text_dim, generator=g)
    return image, modality, context, targets


def test_channels_last_network_equals_default_layout_forward_and_backward():
    cfg = ModelConfig.preset("tiny", text_dim=16)
    torch.manual_seed(0)
    plain = DuPLUS(cfg)
    fast = DuPLUS(cfg)
    fast.load_state_dict(plain.state_dict())
    use_channels_last(fast)
    assert all(p.is_contiguous(memory_format=CL) for p in fast.parameters() if p.dim() == 5)
    inputs = _inputs(cfg)
    a, b = plain(*inputs), fast(*inputs)
    assert torch.allclose(a, b, atol=1e-4)
    a.sigmoid().mean().backward()
    b.sigmoid().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-3), name


def test_every_feature_map_stays_channels_last():
    cfg = ModelConfig.preset("tiny", text_dim=16)
    model = use_channels_last(DuPLUS(cfg))
    flipped: list[str] = []

    def check(name):
        def hook(_module, _inputs, output):
            # A map with one voxel or one channel is both layouts at once; nothing to check.
            if output.dim() == 5 and output.shape[1] > 1 and output.shape[2:].numel() > 1:
                if not output.is_contiguous(memory_format=CL):
                    flipped.append(f"{name} {tuple(output.shape)} {output.stride()}")
        return hook

    for name, module in model.named_modules():
        # Stem convs see a one-channel image (both layouts at once): the stems module's output counts.
        # A 1x1x1 conv's output layout is the backend's choice (single-threaded CPU picks NCDHW); the
        # blocks put their shortcut back in the block's layout, and the head reads either.
        spatial_conv = isinstance(module, nn.Conv3d) and module.kernel_size != (1, 1, 1) and not name.startswith("stems.")
        if spatial_conv or isinstance(module, nn.InstanceNorm3d) or type(module).__name__.endswith(("Block", "Stage", "Stems")):
            module.register_forward_hook(check(name))
    model(*_inputs(cfg))
    assert not flipped, flipped


@pytest.mark.parametrize("channels_last", [False, True])
def test_pretrain_setting_switches_layout_without_changing_the_run_identity(channels_last):
    from duplus.train.pretrain import PretrainSettings

    settings = PretrainSettings.from_config({"pretrain": {"channels_last": channels_last}})
    assert settings.channels_last is channels_last
    # A run may resume with the other layout: it is a speed switch, not a different run.
    assert "channels_last" not in settings.fingerprint()
