"""GPU path of training: bf16 autocast, fused AdamW, pinned loader workers, resume, LoRA (skipped without CUDA)."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from duplus.data.manifest import read_manifests, select_cases
from duplus.hashing import sha256_file
from duplus.model import load_model, lora_target_names, save_model
from duplus.model.adapters import add_adapter, load_adapter, lora_config_from, save_adapter
from duplus.train.batches import TextTable
from duplus.train.checkpoint import list_checkpoints
from duplus.train.finetune import fit
from duplus.train.pretrain import run_pretrain
from duplus.train.sampling import PatchSampler

from .conftest import BASE_CONFIG, PATCH, FakePromptCache

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_pretrain_on_gpu_with_workers_bf16_and_resume(store, tmp_path, monkeypatch):
    config = copy.deepcopy(BASE_CONFIG)
    config["device"] = "cuda"
    config["pretrain"].update(steps=6, checkpoint_every=3, num_workers=2, grad_accum=2)
    original = PatchSampler.sample

    def failing(self, seed, step, index):
        if step == 4:
            raise RuntimeError("killed")
        return original(self, seed, step, index)

    with monkeypatch.context() as patch:
        patch.setattr(PatchSampler, "sample", failing)
        with pytest.raises(RuntimeError):
            run_pretrain(config, list(store.values()), FakePromptCache(), tmp_path / "model.safetensors", tmp_path / "log.csv")
    assert list_checkpoints(tmp_path / "checkpoints") == [3]
    run_pretrain(config, list(store.values()), FakePromptCache(), tmp_path / "model.safetensors", tmp_path / "log.csv")
    log = pd.read_csv(tmp_path / "log.csv")
    assert log["step"].tolist() == [2, 4, 6] and log["loss"].notna().all()
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_lora_on_gpu_round_trip(store, tmp_path):
    device = torch.device("cuda")
    torch.manual_seed(0)
    from duplus.model import DuPLUS, ModelConfig

    base = DuPLUS(ModelConfig.from_config({"model": {"preset": "tiny"}}, text_dim=FakePromptCache().dim))
    save_model(base, tmp_path / "base.safetensors")
    sha = sha256_file(tmp_path / "base.safetensors")
    model, _ = load_model(tmp_path / "base.safetensors", device=device)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = lora_config_from({"rank": 2, "alpha": 4}, lora_target_names(model, ["encoder", "decoder", "film", "controller"]))
    add_adapter(model, config, "gpu")
    cases = select_cases(read_manifests(store.values()), split="train", datasets=["toy_ct"])
    sampler = PatchSampler(cases, PATCH)
    table = TextTable(FakePromptCache(), sampler.all_texts(), device)
    fit(model, sampler, table, steps=3, batch_size=2, lr=0.01, seed=0, amp=torch.bfloat16, num_workers=2)
    state = model.state_dict()
    for key, value in before.items():
        moved = key if key in state else key.rsplit(".", 1)[0] + ".base_layer." + key.rsplit(".", 1)[1]
        assert torch.equal(state[moved], value), key
    save_adapter(model, "gpu", config, tmp_path / "adapter", sha)
    fresh, _ = load_model(tmp_path / "base.safetensors", device=device)
    load_adapter(fresh, tmp_path / "adapter", sha)
    image = torch.randn(1, 1, *PATCH, device=device)
    args = (image, torch.tensor([0], device=device), torch.randn(1, 12, device=device), torch.randn(1, 2, 12, device=device))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(*args), model.eval()(*args))


def test_training_step_never_waits_for_the_gpu(store):
    """No host synchronisation inside a step (no .item(), no GPU-side routing index, no implicit sync)."""
    from duplus.model import DuPLUS, ModelConfig
    from duplus.train.batches import batch_loss
    from duplus.train.optim import GRAD_CLIP, build_optimizer
    from duplus.train.sampling import collate_patches

    device = torch.device("cuda")
    cases = select_cases(read_manifests(store.values()), split="train")
    sampler = PatchSampler(cases, PATCH)
    table = TextTable(FakePromptCache(), sampler.all_texts(), device)
    model = DuPLUS(ModelConfig.preset("tiny", text_dim=FakePromptCache().dim)).to(device).train()
    optimizer = build_optimizer(model.parameters(), 1e-3, 0.0, device)
    # A batch mixing modalities takes the stems' gather/scatter path as well.
    samples = [sampler.sample(0, 0, i) for i in range(8)]
    assert len({s["modality"] for s in samples}) > 1
    batch = collate_patches(samples)
    batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def step() -> None:
        loss = batch_loss(model, batch, table, torch.bfloat16)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # first step: lazy initialisations (cuDNN plans, optimizer state) may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_adaptation_resumes_on_gpu_after_sigterm(store, tmp_path, monkeypatch, caplog):
    """fit() on the GPU in bf16: a SIGTERM checkpoints (CUDA generator included), the rerun resumes."""
    import logging
    import os
    import signal

    import duplus.train.finetune as finetune
    import duplus.train.step as step_module
    from duplus.errors import TrainingInterrupted
    from duplus.model import DuPLUS, ModelConfig

    device = torch.device("cuda")
    torch.manual_seed(0)
    base = DuPLUS(ModelConfig.from_config({"model": {"preset": "tiny"}}, text_dim=FakePromptCache().dim)).to(device)
    settings = {"rank": 2, "alpha": 4, "dropout": 0.2}
    config = lora_config_from(settings, lora_target_names(base, ["encoder", "decoder"]))
    cases = select_cases(read_manifests(store.values()), split="train", datasets=["toy_ct"])
    sampler = PatchSampler(cases, PATCH)
    table = TextTable(FakePromptCache(), sampler.all_texts(), device)
    kwargs = {"steps": 4, "batch_size": 2, "lr": 0.01, "seed": 0, "amp": torch.bfloat16, "num_workers": 2,
              "checkpoints": tmp_path / "checkpoints"}
    real, calls = step_module.accumulated_loss, [0]

    def loss(*args, **kw):
        calls[0] += 1
        if calls[0] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kw)

    model = copy.deepcopy(base)
    add_adapter(model, config, "gpu")
    with monkeypatch.context() as patch:
        patch.setattr(step_module, "accumulated_loss", loss)
        with pytest.raises(TrainingInterrupted):
            fit(model, sampler, table, **kwargs)
    assert list_checkpoints(tmp_path / "checkpoints") == [2]
    model = copy.deepcopy(base)
    add_adapter(model, config, "gpu")
    with caplog.at_level(logging.INFO, logger="duplus.train.finetune"):
        fit(model, sampler, table, **kwargs)
    assert "resuming at step 2 of 4" in caplog.text
    assert list_checkpoints(tmp_path / "checkpoints") == [4, 2]
    assert all(torch.isfinite(v).all() for v in finetune.trained_state(model).values() if v.is_floating_point())
