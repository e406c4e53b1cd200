"""Shapes, prompt conditioning and the one-backbone-pass property of the DuPLUS network."""

import pytest
import torch
from model_helpers import TEXT_DIM, randomize_film

from duplus.errors import ConfigError, ModelError
from duplus.model import DuPLUS, ModelConfig, count_parameters, modality_index


def _inputs(batch: int = 2, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn((batch, 1, size, size, size), generator=g)
    context = torch.randn((batch, TEXT_DIM), generator=g)
    return image, context


@pytest.mark.parametrize("k", [1, 3])
def test_forward_shapes(tiny_model, k):
    image, context = _inputs()
    targets = torch.randn(k, TEXT_DIM)
    with torch.no_grad():
        logits = tiny_model(image, torch.tensor([0, 0]), context, targets)
        per_sample = tiny_model(image, torch.tensor([0, 0]), context, targets.expand(2, -1, -1))
    assert logits.shape == (2, k, 16, 16, 16)
    assert torch.allclose(logits, per_sample)
    assert torch.isfinite(logits).all()
    bottleneck = tiny_model.encode(image, torch.tensor([0, 0]), context)
    assert bottleneck.shape == (2, 64, 2, 2, 2)


def test_odd_sizes_keep_the_input_grid(tiny_model):
    image = torch.randn(1, 1, 13, 18, 11)
    with torch.no_grad():
        logits = tiny_model(image, torch.tensor([1]), torch.randn(1, TEXT_DIM), torch.randn(2, TEXT_DIM))
    assert logits.shape == (1, 2, 13, 18, 11)


def test_mixed_modalities_use_their_own_stem(tiny_model):
    image, context = _inputs(batch=3)
    targets = torch.randn(2, TEXT_DIM)
    modality = torch.tensor([2, 0, 1])
    with torch.no_grad():
        mixed = tiny_model(image, modality, context, targets)
        alone = torch.cat([tiny_model(image[i : i + 1], modality[i : i + 1], context[i : i + 1], targets) for i in range(3)])
        swapped = tiny_model(image, torch.tensor([0, 0, 0]), context, targets)
    assert torch.allclose(mixed, alone, atol=1e-5)
    assert torch.allclose(mixed[1], swapped[1], atol=1e-5)  # sample 1 is CT in both
    assert not torch.allclose(mixed[0], swapped[0])  # PET stem vs CT stem


def test_film_makes_the_context_matter(tiny_model):
    image, context = _inputs(batch=1)
    targets = torch.randn(1, TEXT_DIM)
    modality = torch.tensor([0])
    with torch.no_grad():
        a = tiny_model(image, modality, context, targets)
        b = tiny_model(image, modality, -context, targets)
    assert torch.allclose(a, b), "FiLM generators start as identity"
    randomize_film(tiny_model)
    with torch.no_grad():
        a = tiny_model(image, modality, context, targets)
        b = tiny_model(image, modality, -context, targets)
    assert (a - b).abs().max() > 1e-3


def test_target_prompt_steers_the_head(tiny_model):
    image, context = _inputs(batch=1)
    t = torch.randn(2, TEXT_DIM)
    with torch.no_grad():
        logits = tiny_model(image, torch.tensor([0]), context, t)
        again = tiny_model(image, torch.tensor([0]), context, t.flip(0))
    assert (logits[0, 0] - logits[0, 1]).abs().max() > 1e-3
    assert torch.allclose(logits.flip(1), again, atol=1e-6)  # class order follows prompt order


def test_backbone_runs_once_for_all_classes(tiny_model):
    calls = {"encoder": 0, "decoder": 0}
    tiny_model.encoder.register_forward_hook(lambda *a: calls.__setitem__("encoder", calls["encoder"] + 1))
    tiny_model.decoder.register_forward_hook(lambda *a: calls.__setitem__("decoder", calls["decoder"] + 1))
    image, context = _inputs(batch=1)
    with torch.no_grad():
        logits = tiny_model(image, torch.tensor([0]), context, torch.randn(7, TEXT_DIM))
    assert logits.shape[1] == 7
    assert calls == {"encoder": 1, "decoder": 1}


def test_gradients_reach_every_part(tiny_model):
    tiny_model.train()
    randomize_film(tiny_model, scale=0.1)
    image, context = _inputs(batch=2)
    logits = tiny_model(image, torch.tensor([0, 1]), context, torch.randn(2, TEXT_DIM))
    logits.sigmoid().mean().backward()
    for group in ("stems", "encoder", "decoder", "film", "controller", "text_proj"):
        grads = [p.grad for n, p in tiny_model.named_parameters() if n.startswith(group) and p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), group


def test_paper_preset_size():
    model = DuPLUS(ModelConfig.preset("paper", text_dim=512))
    n = count_parameters(model)
    print(f"paper preset parameters (without text encoder): {n / 1e6:.2f} M")
    assert 39e6 < n < 47e6


def test_bad_inputs_are_named(tiny_model):
    image, context = _inputs(batch=1)
    with pytest.raises(ModelError, match="context"):
        tiny_model(image, torch.tensor([0]), torch.randn(1, TEXT_DIM + 1), torch.randn(1, TEXT_DIM))
    with pytest.raises(ModelError, match="image"):
        tiny_model(image[0], torch.tensor([0]), context, torch.randn(1, TEXT_DIM))
    with pytest.raises(ModelError, match="modality index 5"):
        tiny_model(image, torch.tensor([5]), context, torch.randn(1, TEXT_DIM))
    with pytest.raises(ModelError, match="too small"):
        tiny_model(torch.randn(1, 1, 8, 8, 8), torch.tensor([0]), context, torch.randn(1, TEXT_DIM))
    assert modality_index("mr") == 1 and modality_index("PET") == 2
    with pytest.raises(ConfigError, match="US"):
        modality_index("US")


@pytest.mark.parametrize("budget", [1 << 20, 1 << 12])  # one pass; many voxel chunks
def test_dynamic_head_equals_per_class_convolutions(monkeypatch, budget):
    """The batched head gives each class exactly its own 1x1x1 conv stack C->C->C->1 with ReLU between."""
    import torch.nn.functional as F

    import duplus.model.head as head_module

    monkeypatch.setitem(head_module.HIDDEN_ELEMENTS, "cpu", budget)
    c, k = 8, 5
    head = head_module.DynamicHead(c)
    torch.manual_seed(0)
    # 1320 voxels: 2 chunks at the small budget
    features, params = torch.randn(2, c, 10, 11, 12), torch.randn(2, k, sum(head.splits))
    logits = head(features, params)
    assert logits.shape == (2, k, 10, 11, 12)
    for b in range(2):
        for cls in range(k):
            w1, w2, w3, b1, b2, b3 = params[b, cls].split(head.splits)
            h = F.relu(F.conv3d(features[b : b + 1], w1.reshape(c, c, 1, 1, 1), b1))
            h = F.relu(F.conv3d(h, w2.reshape(c, c, 1, 1, 1), b2))
            expected = F.conv3d(h, w3.reshape(1, c, 1, 1, 1), b3)[0, 0]
            assert torch.allclose(logits[b, cls], expected, atol=1e-5)


@pytest.mark.parametrize("norm, keeps_levels", [("group", True), ("instance", False)])
def test_controller_summary_sees_how_strongly_each_feature_is_present(norm, keeps_levels):
    """Rescaling and shifting each bottleneck channel must change the pooled image summary.

    After an instance norm every channel has mean 0 and variance 1, so per-channel levels, what a
    global average pool is for, are gone; the group norm (the default) keeps them within a group.
    """
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", text_dim=TEXT_DIM)
    model = DuPLUS(ModelConfig.from_dict({**cfg.to_dict(), "controller_norm": norm})).eval()
    bottleneck = torch.randn(1, cfg.bottleneck_channels, 4, 4, 4)
    scale = torch.rand(1, cfg.bottleneck_channels, 1, 1, 1) * 3 + 0.2
    shift = torch.randn(1, cfg.bottleneck_channels, 1, 1, 1) * 2
    with torch.no_grad():
        before = model.controller.pooled(bottleneck)
        after = model.controller.pooled(bottleneck * scale + shift)
    changed = float((after - before).abs().max()) > 1e-2 * float(before.abs().max())
    assert changed == keeps_levels
    with pytest.raises(ConfigError, match="controller_norm"):
        ModelConfig.from_dict({**cfg.to_dict(), "controller_norm": "layer"})


def test_compiled_network_breaks_its_graph_only_where_the_stems_route(tiny_model):
    """torch.compile splits the network only at the stems' host-side routing (data-dependent by
    nature), not at an input check: every other break would cut the compiled step into more graphs."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    args = (torch.randn(2, 1, 16, 16, 16), torch.zeros(2, dtype=torch.long), torch.randn(2, TEXT_DIM),
            torch.randn(2, 3, TEXT_DIM))
    try:
        torch.compile(tiny_model, backend="eager", dynamic=False)(*args)
        reasons = [reason.splitlines()[0] for reason in counters["graph_break"]]
    finally:
        torch._dynamo.reset()
    assert reasons and all("Dynamic shape operator" in r or "Data dependent operator" in r for r in reasons), reasons
