"""LoRA target selection by network part, and that peft accepts the names."""

import pytest
import torch
from model_helpers import TEXT_DIM
from torch import nn

from duplus.errors import ConfigError
from duplus.model import lora_target_names


def test_targets_are_conv_or_linear_by_group(tiny_model):
    modules = dict(tiny_model.named_modules())
    names = lora_target_names(tiny_model, ["encoder", "film"], text_projection=False)
    assert names and all(isinstance(modules[n], (nn.Conv3d, nn.Linear)) for n in names)
    assert {n.split(".")[0] for n in names} == {"encoder", "film"}
    with_text = lora_target_names(tiny_model, ["controller"], text_projection=True)
    assert {n.split(".")[0] for n in with_text} == {"controller", "text_proj"}
    all_parts = lora_target_names(tiny_model, ["stems", "encoder", "decoder", "film", "controller"], False)
    assert "stems.CT.conv" in all_parts and not any(n.startswith("text_proj") for n in all_parts)
    with pytest.raises(ConfigError, match="lora.targets"):
        lora_target_names(tiny_model, ["backbone"], False)


def test_stems_of_the_centers_modalities_only(tiny_model):
    every = lora_target_names(tiny_model, ["stems", "encoder"])
    mri = lora_target_names(tiny_model, ["stems", "encoder"], modalities=["MR"])  # an alias spelling
    assert [n for n in mri if n.startswith("stems.")] == ["stems.MRI.conv"]
    assert {"stems.CT.conv", "stems.PET.conv"} <= set(every) - set(mri)
    assert [n for n in every if not n.startswith("stems.")] == [n for n in mri if not n.startswith("stems.")]
    both = lora_target_names(tiny_model, ["stems"], modalities=["PET", "CT"])
    assert sorted(both) == ["stems.CT.conv", "stems.PET.conv"]
    with pytest.raises(ConfigError, match="unknown modality"):
        lora_target_names(tiny_model, ["stems"], modalities=["ultrasound"])


def test_peft_wraps_the_selected_modules(tiny_model):
    peft = pytest.importorskip("peft")
    names = lora_target_names(tiny_model, ["encoder", "decoder", "film", "controller"], text_projection=False)
    wrapped = peft.get_peft_model(tiny_model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=names))
    lora = [n for n, _ in wrapped.named_modules() if n.endswith("lora_A")]
    assert len(lora) == len(names)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        out = wrapped(x, torch.tensor([0]), torch.randn(1, TEXT_DIM), torch.randn(2, TEXT_DIM))
    assert out.shape == (1, 2, 16, 16, 16)
