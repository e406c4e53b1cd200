"""The learning-rate schedule: warm-up, cosine decay and warm restarts."""

from __future__ import annotations

import math

import pytest
import torch

from duplus.errors import ConfigError
from duplus.train.optim import warmup_cosine
from duplus.train.pretrain import PretrainSettings


def _lrs(steps: int, warmup: int, cycles: int, lr: float = 1.0) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = warmup_cosine(optimizer, warmup, steps, cycles)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_one_cycle_warms_up_then_decays_monotonically_towards_zero():
    rates = _lrs(steps=110, warmup=10, cycles=1)
    assert rates[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    decay = rates[10:]
    assert decay[0] == pytest.approx(1.0)
    assert all(b <= a for a, b in zip(decay, decay[1:]))
    assert decay[50] == pytest.approx(0.5)  # halfway through the cosine
    assert decay[-1] < 0.001


def test_two_cycles_restart_at_the_peak_halfway_through_the_decay():
    rates = _lrs(steps=110, warmup=10, cycles=2)
    first, second = rates[10:60], rates[60:]
    assert first[0] == pytest.approx(1.0) and second[0] == pytest.approx(1.0)
    assert first[25] == pytest.approx(0.5) and second[25] == pytest.approx(0.5)
    assert first[-1] < 0.01 and second[-1] < 0.01
    assert first == pytest.approx(second)  # equal cycles
    assert all(b <= a for a, b in zip(second, second[1:]))


def test_cycles_that_do_not_divide_the_steps_still_end_at_zero_and_restart_once_each():
    rates = _lrs(steps=103, warmup=0, cycles=3)
    restarts = [i for i in range(1, len(rates)) if rates[i] > rates[i - 1] + 1e-9]
    assert len(restarts) == 2
    assert rates[-1] < 0.01
    assert max(rates) == pytest.approx(1.0)
    assert all(0.0 <= r <= 1.0 + 1e-9 for r in rates) and not any(math.isnan(r) for r in rates)


def test_lr_cycles_is_validated_and_one_cycle_keeps_old_resume_identities():
    with pytest.raises(ConfigError, match="lr_cycles"):
        PretrainSettings.from_config({"pretrain": {"lr_cycles": 0}})
    assert "lr_cycles" not in PretrainSettings.from_config({"pretrain": {}}).fingerprint()
    assert PretrainSettings.from_config({"pretrain": {"lr_cycles": 2}}).fingerprint()["lr_cycles"] == 2
    with pytest.raises(ConfigError, match="cosine cycle"):
        warmup_cosine(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 0, 10, 0)
