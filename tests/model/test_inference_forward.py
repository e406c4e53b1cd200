"""The forward without autograd (in-place norms, FiLM and activations) gives the training forward's logits.

Under ``torch.enable_grad()`` the network runs the unchanged out-of-place math; under ``no_grad`` it
overwrites its own intermediates. Logits must agree to float rounding and masks exactly, on inputs
the forward must leave untouched.
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from model_helpers import TEXT_DIM, randomize_film
from torch import nn

import duplus.model.head as head_module
from duplus.inference.predict import predict_masks
from duplus.model import DuPLUS, ModelConfig, use_channels_last
from duplus.model.backbone import InstanceNorm3dKeepLayout, conv3d, pointwise
from duplus.model.film import apply_film
from duplus.model.task_specific import TaskSpecificNet


def _randomize_norms(model: nn.Module) -> None:
    """Norms start as the identity affine; other weights make a folding mistake visible."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.InstanceNorm3d) and module.affine:
                module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=generator))


def _network(**overrides) -> DuPLUS:
    torch.manual_seed(0)
    # Two blocks per stage, as the paper's preset: identity and 1x1x1 shortcuts, FiLM and no-FiLM blocks.
    cfg = ModelConfig(**{"channels": (4, 8, 16), "blocks_per_stage": 2, "text_dim": TEXT_DIM, "embed_dim": 8,
                         **overrides})
    model = DuPLUS(cfg).eval()
    randomize_film(model)
    _randomize_norms(model)
    return model


def _both(model: nn.Module, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.enable_grad():  # the training forward: out-of-place ops, nothing freed early
        reference = model(*inputs)
    assert reference.requires_grad, "the reference must come from the autograd path"
    with torch.no_grad():
        fast = model(*inputs)
    return reference.detach(), fast


@pytest.mark.parametrize("overrides", [{}, {"act": "relu"}, {"act": "leakyrelu"}, {"norm": "group"}])
def test_forward_without_autograd_equals_the_training_forward(overrides):
    model = _network(**overrides)
    image = torch.randn(2, 1, 16, 20, 12)
    modality = torch.tensor([0, 1])  # two stems in one batch
    context, targets = torch.randn(2, TEXT_DIM), torch.randn(5, TEXT_DIM)
    kept = image.clone(), context.clone(), targets.clone()
    reference, fast = _both(model, image, modality, context, targets)
    assert fast.shape == reference.shape == (2, 5, 16, 20, 12)
    assert (fast - reference).abs().max() <= 1e-4
    assert torch.equal(fast > 0, reference > 0)
    for before, after in zip(kept, (image, context, targets)):
        assert torch.equal(before, after), "the forward must not write into its inputs"


def test_inference_mode_and_channels_last_give_the_same_logits():
    model = _network()
    inputs = (torch.randn(1, 1, 16, 16, 16), torch.tensor([2]), torch.randn(1, TEXT_DIM), torch.randn(3, TEXT_DIM))
    reference, _ = _both(model, *inputs)
    with torch.inference_mode():
        assert (model(*inputs) - reference).abs().max() <= 1e-4
    last = use_channels_last(copy.deepcopy(model))
    with torch.no_grad():
        assert (last(*inputs) - reference).abs().max() <= 1e-4


def test_task_specific_network_without_autograd_equals_its_training_forward():
    torch.manual_seed(0)
    model = TaskSpecificNet(ModelConfig(channels=(4, 8, 16), blocks_per_stage=2, text_dim=TEXT_DIM), ["a", "b"]).eval()
    _randomize_norms(model)
    reference, fast = _both(model, torch.randn(1, 1, 16, 16, 16), torch.tensor([0]))
    assert (fast - reference).abs().max() <= 1e-4


def test_encoder_features_survive_the_decoder_for_the_caller():
    """The decoder empties the encoder's list without autograd; the bottleneck still reaches the controller."""
    model = _network()
    image, context = torch.randn(1, 1, 16, 16, 16), torch.randn(1, TEXT_DIM)
    with torch.no_grad():
        features, bottleneck = model.features(image, torch.tensor([0]), context)
        expected = model.encode(image, torch.tensor([0]), context)
    assert torch.equal(bottleneck, expected)
    assert features.shape == (1, model.cfg.head_channels, 16, 16, 16)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d], ids=["NCDHW", "NDHWC"])
def test_in_place_instance_norm_folds_norm_affine_and_film_into_one_pass(layout):
    norm = InstanceNorm3dKeepLayout(6, affine=True)
    _randomize_norms(norm)
    x = (torch.randn(2, 6, 5, 7, 3) * 4 + 2).contiguous(memory_format=layout)
    film = (torch.randn(2, 6) * 0.5, torch.randn(2, 6))
    expected = apply_film(F.instance_norm(x.contiguous(), weight=norm.weight, bias=norm.bias, eps=norm.eps), film)
    with torch.no_grad():
        assert norm.can_overwrite(x)
        out = norm.normalize_(x, film)
    assert out.data_ptr() == x.data_ptr(), "written into its input"
    assert out.is_contiguous(memory_format=layout), "the layout is kept"
    assert torch.allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_pointwise_convolution_as_a_matrix_product_equals_the_convolution(bias):
    torch.manual_seed(0)
    module = conv3d(6, 4, kernel=1)
    if not bias:
        module.conv.bias = None
    x = torch.randn(2, 6, 5, 4, 3)
    expected = module(x).detach()
    with torch.no_grad():
        assert torch.allclose(pointwise(module, x), expected, atol=1e-5)
        channels_last = pointwise(module, x.contiguous(memory_format=torch.channels_last_3d))
    assert torch.allclose(channels_last, expected, atol=1e-5)
    assert channels_last.is_contiguous(memory_format=torch.channels_last_3d), "NDHWC in, NDHWC out"


def test_chunked_dynamic_head_without_autograd_equals_the_training_one(monkeypatch):
    monkeypatch.setitem(head_module.HIDDEN_ELEMENTS, "cpu", 1 << 12)  # several voxel chunks
    head = head_module.DynamicHead(8)
    torch.manual_seed(0)
    features, params = torch.randn(2, 8, 10, 11, 12), torch.randn(2, 5, sum(head.splits))
    reference = head(features, params)
    with torch.no_grad():
        assert torch.allclose(head(features, params), reference, atol=1e-5)


def test_masks_of_a_volume_are_those_of_the_training_forward():
    """``predict_masks`` (no autograd inside) against the same network forced onto the training path."""

    class TrainingPath(nn.Module):
        def __init__(self, net: DuPLUS) -> None:
            super().__init__()
            self.net = net

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            with torch.enable_grad():
                return self.net(*inputs).detach()

    model = _network()
    volume, context, targets = torch.randn(20, 24, 18), torch.randn(TEXT_DIM), torch.randn(4, TEXT_DIM)
    config = {"pretrain": {"patch_size": [16, 16, 16]}, "inference": {"overlap": 0.5, "sw_batch_size": 1}}
    fast = predict_masks(model, volume, "CT", context, targets, config, show_progress=False)
    reference = predict_masks(TrainingPath(model), volume, "CT", context, targets, config, show_progress=False)
    assert fast.shape == reference.shape
    assert (np.asarray(fast) == np.asarray(reference)).all() and np.asarray(fast).any()
