"""Helpers of the prompt tests: a fake encoder that records what it encodes, fake dataset specs.

The fake encoder makes cache tests fast and lets them count exactly what gets encoded.
"""

from __future__ import annotations

import hashlib
import sys
import types
from dataclasses import dataclass

import pytest
import torch


@dataclass(frozen=True)
class FakeSpec:
    """The DatasetSpec fields the prompt catalog reads."""

    name: str
    modality: str
    region: str
    labels: dict[int, str]
    sequence: str | None = None


class FakeEncoder:
    """Deterministic pseudo-embeddings (seeded by the text) that records every encode call."""

    def __init__(self, identity: str = "fake@000000000000", dim: int = 8) -> None:
        self.identity = identity
        self.dim = dim
        self.calls: list[list[str]] = []

    def vector(self, text: str) -> torch.Tensor:
        seed = int(hashlib.sha256(f"{self.identity}|{text}".encode()).hexdigest()[:8], 16)
        return torch.randn(self.dim, generator=torch.Generator().manual_seed(seed))

    def encode(self, texts, batch_size: int = 64) -> torch.Tensor:
        texts = list(texts)
        self.calls.append(texts)
        return torch.stack([self.vector(t) for t in texts]) if texts else torch.zeros(0, self.dim)

    @property
    def encoded(self) -> list[str]:
        return [text for call in self.calls for text in call]


def install_module(monkeypatch: pytest.MonkeyPatch, name: str, **attributes) -> types.ModuleType:
    """Put a stand-in module at ``duplus.data.<name>`` for the duration of a test."""
    import duplus.data

    module = types.ModuleType(f"duplus.data.{name}")
    for key, value in attributes.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, f"duplus.data.{name}", module)
    monkeypatch.setattr(duplus.data, name, module, raising=False)
    return module
