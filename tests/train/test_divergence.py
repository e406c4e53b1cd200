"""A NaN gradient stops training with the step named, before any checkpoint or model holds it."""

import math

import pytest
import torch
from safetensors.torch import load_file

from duplus.errors import TrainingDiverged
from duplus.train import finetune
from duplus.train import step as step_module
from duplus.train.divergence import DivergenceWatch
from duplus.train.pretrain import run_pretrain
from duplus.train.sampling import PatchSampler

from .conftest import BASE_CONFIG, FakePromptCache
from .test_adaptation_resume import _adapter_and_data, base_file  # noqa: F401 (fixture)


def test_watch_remembers_the_first_bad_step_only():
    watch = DivergenceWatch(torch.device("cpu"))
    watch.record(1, torch.tensor(3.0))
    watch.check("training")  # finite: nothing to say
    watch.record(2, torch.tensor(math.inf))
    watch.record(3, torch.tensor(math.nan))
    with pytest.raises(TrainingDiverged, match="gradient norm of step 2 was NaN or infinite"):
        watch.check("training")
    off = DivergenceWatch(torch.device("cpu"), enabled=False)  # fp16: its GradScaler skips such steps
    off.record(1, torch.tensor(math.nan))
    off.check("training")


def _poison_step(monkeypatch, step_to_poison: int) -> None:
    """One NaN voxel in a patch of the given optimizer step (0-based), as a corrupt case would give."""
    original = PatchSampler.sample

    def sample(self, seed, step, index):
        out = original(self, seed, step, index)
        if step == step_to_poison and index == 0:
            out["image"][0, 0, 0, 0] = math.nan
        return out

    monkeypatch.setattr(PatchSampler, "sample", sample)


def test_pretraining_stops_before_writing_nan_weights(store, tmp_path, monkeypatch):
    config = {**BASE_CONFIG, "pretrain": {**BASE_CONFIG["pretrain"], "steps": 7, "checkpoint_every": 3, "log_every": 2}}
    _poison_step(monkeypatch, 3)  # the 4th step
    with pytest.raises(TrainingDiverged, match="step 4 was NaN or infinite"):
        run_pretrain(config, list(store.values()), FakePromptCache(), tmp_path / "model.safetensors",
                     tmp_path / "train_log.csv")
    assert not (tmp_path / "model.safetensors").exists()
    saved = sorted((tmp_path / "checkpoints").glob("step_*.safetensors"))
    assert [p.name for p in saved] == ["step_00000003.safetensors"]  # written before step 4 only
    assert all(torch.isfinite(t).all() for t in load_file(saved[0]).values() if t.is_floating_point())
    assert step_module.DivergenceWatch is DivergenceWatch  # the one watch every training step reports to


def test_lora_fit_stops_before_its_checkpoint_holds_nan(base_file, store, tmp_path, monkeypatch):  # noqa: F811
    model, sampler, table = _adapter_and_data(base_file, store)
    _poison_step(monkeypatch, 1)
    folder = tmp_path / "checkpoints"
    with pytest.raises(TrainingDiverged, match="step 2 was NaN or infinite"):
        finetune.fit(model, sampler, table, steps=4, batch_size=2, lr=0.01, seed=1, amp=None, checkpoint_every=4,
                     checkpoints=folder)
    assert not list(folder.glob("step_*"))
