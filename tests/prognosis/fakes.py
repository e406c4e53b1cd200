"""Tiny stand-ins for the DuPLUS model and the prompt cache (the real ones live in other packages)."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F


class FakeDuPLUS(torch.nn.Module):
    """encode: channel c of the bottleneck is (c + 1) x the mean of each 4^3 cell of the image.
    forward: every target 'predicts' tumour where the image exceeds 0.5."""

    size_divisor = 4

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.register_buffer("scale", torch.arange(1, channels + 1, dtype=torch.float32))
        self.encode_calls = 0
        self.forward_calls = 0

    def encode(self, image, modality, context):
        assert image.ndim == 5 and modality.dtype == torch.long and context.ndim == 2
        self.encode_calls += 1
        return F.avg_pool3d(image, 4) * self.scale.view(1, -1, 1, 1, 1)

    def forward(self, image, modality, context, targets):
        assert targets.ndim == 3 and targets.shape[0] == image.shape[0]
        self.forward_calls += 1
        return ((image - 0.5) * 20).expand(-1, targets.shape[1], -1, -1, -1)


class FakePromptCache:
    """Deterministic 8-d embedding per text."""

    def get(self, text: str) -> torch.Tensor:
        seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
        return torch.from_numpy(np.random.default_rng(seed).normal(size=8).astype(np.float32))


def synthetic_cohort(n: int = 300, seed: int = 0, image_effect: float = 1.0, ehr_effect: float = 1.0):
    """Patients whose log hazard is image_effect * image[:, 0] + ehr_effect * z(age); the other
    image columns, weight, hpv and center are noise. About 60 % events, some EHR values missing."""
    import pandas as pd

    from duplus.prognosis.ehr import EHRSchema, validate_ehr
    from duplus.prognosis.models import Cohort

    rng = np.random.default_rng(seed)
    image = rng.normal(size=(n, 6))
    age = rng.normal(60, 10, size=n)
    log_hazard = image_effect * image[:, 0] + ehr_effect * (age - 60) / 10
    event_time = rng.exponential(np.exp(-log_hazard)) * 12
    censor_time = rng.uniform(0, 30, size=n)
    center = rng.choice(["A", "B", "C"], size=n)
    frame = pd.DataFrame({
        "pid": [f"P{i:03d}" for i in range(n)], "t": np.minimum(event_time, censor_time),
        "e": (event_time <= censor_time).astype(int), "age": age,
        "weight": np.where(rng.random(n) < 0.1, np.nan, rng.normal(75, 12, size=n)),
        "center": center, "hpv": rng.integers(0, 2, size=n)})
    schema = EHRSchema(id="pid", time="t", event="e", numeric=("age", "weight"), categorical=("center",),
                       binary=("hpv",))
    table = validate_ehr(frame, schema, source="synthetic")
    return Cohort(ids=table.ids, time=table.time, event=table.event, ehr=table.frame, schema=schema,
                  image=image, center=center)
