"""Shared fixtures of the prompt tests: the real offline encoder (loaded once), a fake encoder, fake specs."""

from __future__ import annotations

import pytest
import torch
from prompt_helpers import FakeEncoder, FakeSpec


@pytest.fixture(scope="session")
def minilm():
    from duplus.prompts.encoder import TextEncoder

    return TextEncoder("minilm")


@pytest.fixture
def fake_encoder() -> FakeEncoder:
    return FakeEncoder()


@pytest.fixture
def specs() -> list[FakeSpec]:
    return [
        FakeSpec("ct", "CT", "abdomen", {0: "background", 1: "liver", 2: "liver tumor"}),
        FakeSpec("mr", "MRI", "abdomen", {1: "liver", 2: "spleen"}, sequence="T2"),
        FakeSpec("pet", "PET", "head and neck", {1: "gross tumor volume"}),
    ]


@pytest.fixture(scope="session")
def tiny_clip():
    """Writes a tiny random CLIP (text tower, or full model) with a character-level tokenizer to a folder."""
    import transformers

    def build(folder, projection: bool = True, full: bool = False):
        letters = "abcdefghijklmnopqrstuvwxyz0123456789.,-"
        vocab = {c: i for i, c in enumerate(letters)}
        vocab.update({f"{c}</w>": len(letters) + i for i, c in enumerate(letters)})
        vocab["<|startoftext|>"] = len(vocab)
        vocab["<|endoftext|>"] = len(vocab)
        tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[])
        text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=77, projection_dim=16,
                    bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                    pad_token_id=vocab["<|endoftext|>"])
        torch.manual_seed(0)
        if full:
            vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          image_size=32, patch_size=16, projection_dim=16)
            config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
            model = transformers.CLIPModel(config)
        else:
            config = transformers.CLIPTextConfig(**text)
            model_class = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
            model = model_class(config)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return folder

    return build
