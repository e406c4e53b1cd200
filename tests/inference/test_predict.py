"""Sliding-window inference: shapes, padding, blending and one backbone pass per window."""

import dataclasses

import pytest
import torch

from duplus.errors import ConfigError
from duplus.inference.predict import (
    count_windows,
    fast_config,
    inference_settings,
    predict_masks,
    predict_probabilities,
    window_batch,
)
from duplus.model import DuPLUS, ModelConfig

TEXT_DIM = 12


def _config(patch=(16, 16, 16), blend="gaussian", overlap=0.5):
    return {"pretrain": {"patch_size": list(patch)}, "inference": {"overlap": overlap, "sw_batch_size": 2, "blend": blend}}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DuPLUS(ModelConfig.preset("tiny", text_dim=TEXT_DIM))


def test_volume_larger_than_window(model):
    model.train()
    calls = []
    handle = model.encoder.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        probs = predict_probabilities(model, torch.randn(20, 30, 18), "MRI", torch.randn(TEXT_DIM), torch.randn(4, TEXT_DIM),
                                      _config())
    finally:
        handle.remove()
    assert probs.shape == (4, 20, 30, 18) and probs.dtype == torch.float32 and probs.device.type == "cpu"
    assert float(probs.min()) >= 0.0 and float(probs.max()) <= 1.0
    # One encoder pass per window for all 4 classes together.
    assert sum(calls) == count_windows((20, 30, 18), (16, 16, 16), 0.5) == 2 * 3 * 2
    assert model.training, "the caller's train/eval mode is restored"


def test_volume_smaller_than_window_is_padded(model):
    image, ctx, tgt = torch.randn(9, 16, 5), torch.randn(TEXT_DIM), torch.randn(2, TEXT_DIM)
    probs = predict_probabilities(model, image.numpy(), 0, ctx, tgt, _config())
    assert probs.shape == (2, 9, 16, 5)
    # One window over the volume padded at the far end with its minimum (as training pads), cropped back.
    padded = torch.nn.functional.pad(image, (0, 11, 0, 0, 0, 7), value=float(image.min()))
    with torch.no_grad():
        direct = torch.sigmoid(model.eval()(padded[None, None], torch.tensor([0]), ctx[None], tgt))[0, :, :9, :, :5]
    assert torch.allclose(probs, direct, atol=1e-5)


@pytest.mark.parametrize("shape", [(20, 30, 18), (9, 16, 5)], ids=["windows", "padded"])
def test_the_image_is_read_never_written_and_a_float32_array_is_not_copied(model, shape, monkeypatch):
    import numpy as np

    from duplus.inference import predict as predict_module

    image = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    kept = image.copy()
    shared = []
    real = predict_module._as_volume

    def recording(array):
        volume = real(array)
        shared.append(np.shares_memory(volume.numpy(), array))
        return volume

    monkeypatch.setattr(predict_module, "_as_volume", recording)
    ctx, tgt = torch.randn(TEXT_DIM), torch.randn(3, TEXT_DIM)
    masks = predict_masks(model, image, "CT", ctx, tgt, _config())
    probs = predict_probabilities(model, image, "CT", ctx, tgt, _config())
    assert np.array_equal(image, kept), "inference must not change the caller's image"
    assert shared == [True, True], "a writable float32 array is used in place, not copied"
    # A read-only (e.g. memory-mapped) or float64 image is copied and gives the same masks.
    readonly = image.copy()
    readonly.flags.writeable = False
    for other in (readonly, image.astype(np.float64)):
        again = predict_masks(model, other, "CT", ctx, tgt, _config())
        assert all(np.array_equal(again[k], masks[k]) for k in range(3))
    assert shared[2:] == [False, False]
    assert probs.shape == (3, *shape)


def test_a_cpu_infers_in_channels_last_and_gives_the_model_back_as_it_came(model):
    from duplus.model import is_channels_last

    seen = []
    handle = model.decoder.register_forward_hook(
        lambda m, args, out: seen.append(out.is_contiguous(memory_format=torch.channels_last_3d) and not out.is_contiguous()))
    image, ctx, tgt = torch.randn(20, 30, 18), torch.randn(TEXT_DIM), torch.randn(3, TEXT_DIM)
    try:
        layouts = {}
        for setting in (None, False, True):
            seen.clear()
            config = _config()
            config["inference"]["channels_last"] = setting
            layouts[setting] = (predict_probabilities(model, image, "CT", ctx, tgt, config), set(seen))
            assert is_channels_last(model) is False, "the caller's model comes back in its own layout"
    finally:
        handle.remove()
    assert layouts[None][1] == layouts[True][1] == {True} and layouts[False][1] == {False}
    assert (layouts[None][0] - layouts[False][0]).abs().max() <= 1e-5


def test_single_window_equals_direct_forward(model):
    image, ctx, tgt = torch.randn(16, 16, 16), torch.randn(TEXT_DIM), torch.randn(3, TEXT_DIM)
    probs = predict_probabilities(model, image, "PET", ctx, tgt, _config(blend="constant"))
    with torch.no_grad():
        direct = torch.sigmoid(model.eval()(image[None, None], torch.tensor([2]), ctx[None], tgt))[0]
    assert torch.allclose(probs, direct, atol=1e-5)


def test_settings_are_validated():
    assert inference_settings(_config())["roi"] == (16, 16, 16)
    with pytest.raises(ConfigError, match="inference.blend"):
        inference_settings(_config(blend="median"))
    with pytest.raises(ConfigError, match="pretrain.patch_size"):
        inference_settings(_config(patch=(16, 16)))
    with pytest.raises(ConfigError, match="inference.boundary_budget_mb"):
        inference_settings({**_config(), "inference": {"boundary_budget_mb": -1}})


def test_a_modality_name_runs_the_stem_of_that_name_whatever_the_stem_order():
    """model.overrides.modalities may reorder or drop stems: a CT volume must still meet stems.CT."""
    net = DuPLUS(dataclasses.replace(ModelConfig.preset("tiny", text_dim=TEXT_DIM), modalities=("MRI", "CT")))
    ran = []
    for name, stem in net.stems.items():
        stem.register_forward_hook(lambda m, args, out, name=name: ran.append(name))
    predict_probabilities(net, torch.randn(16, 16, 16), "CT", torch.randn(TEXT_DIM), torch.randn(1, TEXT_DIM),
                          _config(), show_progress=False)
    assert set(ran) == {"CT"}
    with pytest.raises(ConfigError, match=r"'PET'.*\['MRI', 'CT'\]"):
        predict_probabilities(net, torch.randn(16, 16, 16), "PET", torch.randn(TEXT_DIM), torch.randn(1, TEXT_DIM),
                              _config(), show_progress=False)


@pytest.mark.parametrize("setting, passed, used", [("off", None, "off"), ("bf16", None, "bf16"), (None, None, "auto"),
                                                   ("off", "fp16", "fp16")])
def test_inference_runs_in_the_precision_the_model_trained_in(model, monkeypatch, setting, passed, used):
    """``pretrain.amp: off`` keeps a GPU evaluation in fp32 too; an explicit ``amp`` argument wins."""
    import duplus.inference.predict as inference

    seen = []
    real = inference.autocast_for
    monkeypatch.setattr(inference, "autocast_for", lambda device, amp: seen.append(amp) or real(device, amp))
    config = _config()
    if setting is not None:
        config["pretrain"]["amp"] = setting
    predict_probabilities(model, torch.randn(16, 16, 16), "CT", torch.randn(TEXT_DIM), torch.randn(2, TEXT_DIM), config,
                          amp=passed, show_progress=False)
    assert seen and set(seen) == {used}


@pytest.mark.parametrize("width, window, configured, expected", [
    (8, (16, 16, 16), None, [2] * 24),  # 8 x 16 x 16 elements: torch's slow path at batch 1, so pairs
    (32, (24, 32, 32), None, [1] * 12),  # 32 x 24 x 32 > 20,480: oneDNN at batch 1, one at a time
    (32, (24, 32, 32), 3, [3, 1] * 3),  # configured: kept (a batch does not reach into the next row of windows)
])
def test_window_batch_on_a_cpu_follows_the_window_size_unless_configured(width, window, configured, expected):
    torch.manual_seed(0)
    net = DuPLUS(ModelConfig(channels=(width, 16), blocks_per_stage=1, text_dim=TEXT_DIM, embed_dim=8))
    calls = []
    handle = net.encoder.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    config = _config(patch=window)
    config["inference"]["sw_batch_size"] = configured
    try:
        predict_masks(net, torch.randn(2 * window[0], 40, 40), "CT", torch.randn(TEXT_DIM), torch.randn(2, TEXT_DIM), config,
                      show_progress=False)
    finally:
        handle.remove()
    assert calls == expected
    assert window_batch(config, torch.device("cuda"), width) == (configured or 2)
    assert inference_settings(config)["sw_batch_size"] == (configured or 2)  # what a config without a device says


def test_fast_settings_run_fewer_windows_and_keep_the_rest(model):
    config = {**_config(), "inference": {"overlap": 0.5, "threshold": 0.3}}
    fast = fast_config(config)
    assert config["inference"]["overlap"] == 0.5, "the caller's config is not changed"
    assert inference_settings(fast)["threshold"] == 0.3
    assert count_windows((64, 96, 96), (16, 16, 16), inference_settings(fast)["overlap"]) < \
        count_windows((64, 96, 96), (16, 16, 16), 0.5)
