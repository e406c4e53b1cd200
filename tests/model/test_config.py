"""ModelConfig presets, overrides and round trips."""

import pytest

from duplus.errors import ConfigError
from duplus.model import ModelConfig


def test_presets_and_overrides():
    cfg = ModelConfig.from_config({"model": {"preset": "tiny", "overrides": {"embed_dim": 24, "channels": [4, 8, 16]}}},
                                  text_dim=384)
    assert cfg.channels == (4, 8, 16) and cfg.embed_dim == 24 and cfg.text_dim == 384
    assert cfg.head_channels == 8 and cfg.n_dynamic_params == 153
    paper = ModelConfig.from_config({"model": {"preset": "paper"}}, text_dim=512)
    assert paper.channels == (32, 64, 128, 256, 320) and paper.blocks_per_stage == 2 and paper.embed_dim == 256


def test_unknown_override_names_the_key():
    with pytest.raises(ConfigError, match=r"model\.overrides\.chanels"):
        ModelConfig.from_config({"model": {"preset": "tiny", "overrides": {"chanels": [8]}}}, text_dim=8)
    with pytest.raises(ConfigError, match=r"model\.overrides\.text_dim"):
        ModelConfig.from_config({"model": {"preset": "tiny", "overrides": {"text_dim": 8}}}, text_dim=8)
    with pytest.raises(ConfigError, match=r"model\.preset"):
        ModelConfig.from_config({"model": {"preset": "huge"}}, text_dim=8)
    with pytest.raises(ConfigError, match="blocks_per_stage"):
        ModelConfig.from_config({"model": {"preset": "tiny", "overrides": {"blocks_per_stage": 0}}}, text_dim=8)


def test_dict_round_trip():
    cfg = ModelConfig.preset("tiny", text_dim=12)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown model field"):
        ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})
