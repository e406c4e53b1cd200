"""Multiply-add counting per window."""

from duplus.model import ModelConfig, count_macs, efficiency


def test_macs_scale_with_window_and_classes(tiny_model):
    cfg = ModelConfig.preset("tiny", text_dim=16)
    small = count_macs(cfg, (16, 16, 16))
    big = count_macs(cfg, (32, 32, 32))
    # Convolutions dominate and scale with voxels (x8); only the prompt projections do not.
    assert 7.5 < big / small < 8.5
    per_class = count_macs(cfg, (16, 16, 16), n_classes=2) - small
    assert per_class >= 16**3 * (64 + 64 + 8)
    stem_macs = 16**3 * 27 * 8
    assert small > stem_macs
    report = efficiency(tiny_model, (16, 16, 16))
    assert report["macs_per_window"] == small and report["params"] > 0 and report["window"] == [16, 16, 16]
