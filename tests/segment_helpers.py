"""A tiny model and an anisotropic, non-LPS scan for the `duplus segment` tests.

Prompt resolution and the prompt cache are replaced by fakes; preprocessing and restoring are real.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from duplus.model import DuPLUS, ModelConfig, save_model
from duplus.prompts.catalog import ResolvedPrompt
from duplus.segment import network, request

TEXT_DIM = 4
DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # RAS-like: not the LPS of the preprocessed grid


class FakeCache:
    dim = TEXT_DIM
    encoder_identity = "fake@000"

    def get(self, text):
        return torch.full((TEXT_DIM,), float(len(text) % 7))

    def get_many(self, texts):
        return torch.stack([self.get(t) for t in texts])


def make_setup(tmp_path: Path, monkeypatch: Any) -> dict[str, Any]:
    """Scan (scan.nii.gz), tiny model, its sha256 and a run config; prompts resolve without the taxonomy."""
    array = np.zeros((10, 18, 20), np.float32)  # Z, Y, X
    array[3:7, 5:13, 4:16] = 100.0
    scan = sitk.GetImageFromArray(array)
    scan.SetSpacing((1.5, 1.2, 3.0))
    scan.SetOrigin((5.0, -3.0, 7.0))
    scan.SetDirection(DIRECTION)
    path = tmp_path / "scan.nii.gz"
    sitk.WriteImage(scan, str(path))
    torch.manual_seed(0)
    weights = tmp_path / "model.safetensors"
    sidecar = save_model(DuPLUS(ModelConfig.preset("tiny", text_dim=TEXT_DIM)), weights,
                         {"text_encoder": "fake@000", "patch_size": [16, 16, 16]})

    def resolve(prompts, modality, sequence, dataset_classes=()):
        from duplus.prompts.catalog import split_free_text

        return [ResolvedPrompt(p, p if p in ("liver", "liver tumor") else None, f"A scan of a {p}.")
                for p in split_free_text(prompts or "")]

    monkeypatch.setattr(request, "resolve_prompts", resolve)
    monkeypatch.setattr(network, "prompt_embeddings", lambda path, texts, config, device: FakeCache())
    config = {"preprocess": {"spacing": [2.0, 2.0, 2.0]}, "inference": {"overlap": 0.25, "sw_batch_size": 1}}
    return {"scan": path, "image": sitk.ReadImage(str(path)), "weights": weights, "sha": sidecar["sha256"], "config": config}


class FakeEncoder:
    """The encoder FakeCache stands for, to write a real cache file for `duplus segment` run as its own process."""

    identity, dim = FakeCache.encoder_identity, TEXT_DIM

    def encode(self, texts, batch_size=64):
        return torch.stack([FakeCache().get(text) for text in texts])


def write_prompt_cache(path: Path, prompts: str, modality: str = "CT", region: str = "abdomen") -> Path:
    """A prompt cache holding the context prompt and the class prompts of ``prompts`` as the real resolver words them."""
    from duplus.prompts.cache import build_prompt_cache
    from duplus.prompts.catalog import resolve_free_text
    from duplus.prompts.templates import context_prompt

    texts = [context_prompt(modality, region)] + [item.text for item in resolve_free_text(prompts, modality)]
    build_prompt_cache(texts, FakeEncoder(), path)
    return path
