"""Small DuPLUS networks shared by the model tests."""

import pytest
import torch
from model_helpers import TEXT_DIM

from duplus.model import DuPLUS, ModelConfig


@pytest.fixture()
def tiny_cfg() -> ModelConfig:
    return ModelConfig.preset("tiny", text_dim=TEXT_DIM)


@pytest.fixture()
def tiny_model(tiny_cfg: ModelConfig) -> DuPLUS:
    torch.manual_seed(0)
    return DuPLUS(tiny_cfg).eval()
