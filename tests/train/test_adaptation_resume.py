"""A LoRA job stopped by SIGTERM (or killed) resumes: trainings from their checkpoints, finished phases kept."""

from __future__ import annotations

import copy
import json
import os
import signal

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import duplus.train.finetune as finetune
import duplus.train.step as step_module
from duplus.data.manifest import read_manifests, select_cases
from duplus.errors import TrainingInterrupted
from duplus.model import load_model, lora_target_names, save_model
from duplus.model.adapters import add_adapter, lora_config_from
from duplus.train.batches import TextTable
from duplus.train.phase_journal import FOLDER
from duplus.train.sampling import PatchSampler

from .conftest import BASE_CONFIG, PATCH, FakePromptCache
from .test_lora import _base

# Timing and memory differ between any two runs; resumed_phases says what the rerun took over.
RUN_DEPENDENT = ("seconds_lora", "seconds_full", "peak_rss_mb_lora", "peak_rss_mb_full", "resumed_phases")


@pytest.fixture(scope="module")
def base_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "model.safetensors"
    save_model(_base(0), path, meta={"patch_size": PATCH})
    return path


def _sigterm_after(monkeypatch, steps: int, phase_marker: list[str] | None = None, phase: str | None = None) -> None:
    """SIGTERM to this process during the ``steps``-th training step (of ``phase``, if given)."""
    real = step_module.accumulated_loss
    count = [0]

    def loss(*args, **kwargs):
        if phase is None or (phase_marker and phase_marker[-1] == phase):
            count[0] += 1
            if count[0] == steps:
                os.kill(os.getpid(), signal.SIGTERM)  # the StopFlag handler only sets a flag
        return real(*args, **kwargs)

    monkeypatch.setattr(step_module, "accumulated_loss", loss)


def _adapter_and_data(base_file, store):
    base, _ = load_model(base_file)
    model = copy.deepcopy(base)
    torch.manual_seed(3)
    # Dropout on the LoRA path: the resumed run must restore the random stream, not only the weights.
    settings = {**BASE_CONFIG["lora"], "rank": 2, "alpha": 4, "dropout": 0.3}
    add_adapter(model, lora_config_from(settings, lora_target_names(model, ["encoder", "decoder"])), "siteB")
    cases = select_cases(read_manifests(store.values()), split="train", datasets=["toy_ct"], centers=["siteB"])
    sampler = PatchSampler(cases, PATCH)
    return model, sampler, TextTable(FakePromptCache(), sampler.all_texts(), torch.device("cpu"))


def _trained(model):
    return {k: v.clone() for k, v in finetune.trained_state(model).items()}


def test_fit_stopped_by_sigterm_resumes_bit_identical(base_file, store, tmp_path, monkeypatch):
    kwargs = {"steps": 6, "batch_size": 2, "lr": 0.01, "seed": 1, "amp": None, "checkpoint_every": 4}
    model, sampler, table = _adapter_and_data(base_file, store)
    torch.manual_seed(11)
    finetune.fit(model, sampler, table, **kwargs)  # uninterrupted, no checkpoints
    expected = _trained(model)

    folder = tmp_path / "checkpoints"
    model, sampler, table = _adapter_and_data(base_file, store)
    torch.manual_seed(11)
    with monkeypatch.context() as patch:
        _sigterm_after(patch, 2)
        with pytest.raises(TrainingInterrupted, match="stopped at step 2 of 6"):
            finetune.fit(model, sampler, table, checkpoints=folder, **kwargs)
    assert sorted(p.name for p in folder.glob("*.json")) == ["step_00000002.json"]
    # Only the adapter and buffers are checkpointed, not the frozen base.
    saved = load_file(folder / "step_00000002.safetensors")
    assert sum(t.numel() for t in saved.values()) < 0.5 * sum(p.numel() for p in model.parameters())

    model, sampler, table = _adapter_and_data(base_file, store)
    torch.manual_seed(99)  # whatever the process drew before: the checkpoint's state is restored
    stats = finetune.fit(model, sampler, table, checkpoints=folder, **kwargs)
    assert stats.seconds > 0 and stats.rss_mb > 0 and stats.cuda_mb is None
    got = _trained(model)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert sorted(p.name for p in folder.glob("*.json")) == ["step_00000004.json", "step_00000006.json"]


def test_sigterm_in_the_last_step_still_stops(base_file, store, tmp_path, monkeypatch):
    """The job's next phase is an evaluation that would not stop: the request is honoured after the
    final checkpoint, and the rerun trains no step."""
    kwargs = {"steps": 3, "batch_size": 1, "lr": 0.01, "seed": 1, "amp": None, "checkpoints": tmp_path}
    model, sampler, table = _adapter_and_data(base_file, store)
    with monkeypatch.context() as patch:
        _sigterm_after(patch, 3)
        with pytest.raises(TrainingInterrupted, match="stopped at step 3 of 3"):
            finetune.fit(model, sampler, table, **kwargs)
    expected = _trained(model)
    model, sampler, table = _adapter_and_data(base_file, store)
    with monkeypatch.context() as patch:
        patch.setattr(step_module, "accumulated_loss", lambda *a, **k: pytest.fail("a finished training trained again"))
        finetune.fit(model, sampler, table, **kwargs)
    assert all(torch.equal(v, expected[k]) for k, v in _trained(model).items())


def test_checkpoint_writes_are_left_out_of_the_measured_peak(base_file, store, tmp_path, monkeypatch):
    """Full fine-tuning checkpoints the whole model and its optimizer state: writing that must not
    count as the training's memory (LoRA's checkpoint is a few kB, so the comparison would tilt)."""
    from duplus.train import checkpoint as checkpoint_module

    real = checkpoint_module.save_checkpoint

    def bloated(*args, **kwargs):
        ballast = bytearray(400 * 2**20)  # 400 MiB touched while the checkpoint is written
        ballast[::4096] = b"x" * len(ballast[::4096])
        real(*args, **kwargs)
        del ballast

    model, sampler, table = _adapter_and_data(base_file, store)
    plain = finetune.fit(model, sampler, table, steps=2, batch_size=1, lr=0.01, seed=1, amp=None)
    monkeypatch.setattr(finetune, "save_checkpoint", bloated)
    model, sampler, table = _adapter_and_data(base_file, store)
    checkpointed = finetune.fit(model, sampler, table, steps=2, batch_size=1, lr=0.01, seed=1, amp=None,
                                checkpoints=tmp_path, checkpoint_every=1)
    assert checkpointed.rss_mb < plain.rss_mb + 200, (plain, checkpointed)


def test_checkpoint_of_another_adapter_is_refused(base_file, store, tmp_path):
    from duplus.errors import CheckpointError

    model, sampler, table = _adapter_and_data(base_file, store)
    finetune.fit(model, sampler, table, steps=1, batch_size=1, lr=0.01, seed=1, amp=None, checkpoints=tmp_path)
    full, _ = load_model(base_file)
    for param in full.parameters():
        param.requires_grad_(True)
    with pytest.raises(CheckpointError, match="other trainable tensors"):
        finetune.fit(full, sampler, table, steps=2, batch_size=1, lr=0.01, seed=1, amp=None, checkpoints=tmp_path)


def _fake_evaluate(calls: list[str], phase_marker: list[str]):
    def evaluate(model, cases, cache, config):
        calls.append(phase_marker[-1])
        # Scores that depend on the weights, so a resumed model that differed would show.
        value = float(sum(p.double().sum() for p in model.parameters()).item() % 1.0)
        return pd.DataFrame([{"dataset": r.dataset, "case": r.case, "center": r.center, "class": c,
                              "dice": value if c == "liver" else float("nan"), "hd95": 1.0, "nsd": value}
                             for r in cases for c in ("liver", "spleen")])
    return evaluate


def _tracking_fit(phase_marker: list[str]):
    real = finetune.fit

    def fit(model, *args, desc, **kwargs):
        phase_marker.append("full_ft" if desc.startswith("full") else "lora")
        return real(model, *args, desc=desc, **kwargs)
    return fit


def _run(lora, store, base_file, out, monkeypatch, config=None, stop_in=None):
    marker, calls = ["zero_shot"], []
    monkeypatch.setattr(lora, "_evaluate", _fake_evaluate(calls, marker))
    monkeypatch.setattr(lora, "fit", _tracking_fit(marker))
    if stop_in is not None:
        _sigterm_after(monkeypatch, 2, marker, stop_in)
    config = config or _config()
    return lora.run_lora(config, "ct_siteB", list(store.values()), FakePromptCache(), base_file, out), calls


def _config():
    config = copy.deepcopy(BASE_CONFIG)
    config["lora"].update(rank=1, steps=4, checkpoint_every=3)
    return config


@pytest.mark.parametrize("stop_in", ["lora", "full_ft"])
def test_run_lora_resumes_after_sigterm_with_the_uninterrupted_results(stop_in, store, base_file, tmp_path,
                                                                       monkeypatch):
    import duplus.train.lora as lora

    with monkeypatch.context() as patch:
        reference, _ = _run(lora, store, base_file, tmp_path / "reference", patch)
    assert reference["resumed_phases"] == [] and not (tmp_path / "reference" / FOLDER).exists()

    out = tmp_path / "resumed"
    with monkeypatch.context() as patch, pytest.raises(TrainingInterrupted):
        _run(lora, store, base_file, out, patch, stop_in=stop_in)
    assert not (out / "metrics.json").exists()
    assert (out / FOLDER / stop_in / "step_00000002.json").is_file()

    with monkeypatch.context() as patch:
        metrics, calls = _run(lora, store, base_file, out, patch)
    finished = ["zero_shot"] if stop_in == "lora" else ["zero_shot", "lora"]
    assert metrics["resumed_phases"] == finished
    assert calls == [p for p in ("zero_shot", "lora", "full_ft") if p not in finished]  # nothing evaluated twice
    assert {k: v for k, v in metrics.items() if k not in RUN_DEPENDENT} == \
        {k: v for k, v in reference.items() if k not in RUN_DEPENDENT}
    assert not (out / FOLDER).exists()
    want = load_file(tmp_path / "reference" / "adapter" / "adapter_model.safetensors")
    got = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(want[k], got[k]) for k in want)
    meta = [json.loads((d / "adapter_meta.json").read_text()) for d in (tmp_path / "reference", out)]
    assert meta[0] == meta[1]


def _interrupted_in_full_ft(lora, store, base_file, out, monkeypatch):
    with monkeypatch.context() as patch, pytest.raises(TrainingInterrupted):
        _run(lora, store, base_file, out, patch, stop_in="full_ft")


def test_other_settings_redo_only_the_phases_they_change(store, base_file, tmp_path, monkeypatch, caplog):
    import logging

    import duplus.train.lora as lora

    caplog.set_level(logging.INFO, logger="duplus.train.finetune")

    out = tmp_path / "out"
    _interrupted_in_full_ft(lora, store, base_file, out, monkeypatch)
    config = _config()
    config["lora"]["lr"] = 0.05  # LoRA's own: zero-shot kept, full fine-tuning resumes its checkpoint
    with monkeypatch.context() as patch:
        metrics, calls = _run(lora, store, base_file, out, patch, config=config)
    assert metrics["resumed_phases"] == ["zero_shot"] and calls == ["lora", "full_ft"]
    assert "lora.json: finished by a run with other settings" in caplog.text
    assert "full fine-tuning ct_siteB: resuming at step 2 of 4" in caplog.text

    out = tmp_path / "out2"
    _interrupted_in_full_ft(lora, store, base_file, out, monkeypatch)
    config = _config()
    config["lora"]["full_finetune_lr"] = 0.05  # full fine-tuning's own: its checkpoints are not used
    caplog.clear()
    with monkeypatch.context() as patch:
        metrics, calls = _run(lora, store, base_file, out, patch, config=config)
    assert metrics["resumed_phases"] == ["zero_shot", "lora"] and calls == ["full_ft"]
    assert "starting the full_ft phase over" in caplog.text and "resuming" not in caplog.text


def test_the_finished_lora_phase_survives_its_output_folder_being_deleted(store, base_file, tmp_path, monkeypatch):
    """adapter/ is a declared output of rule lora_center: Snakemake deletes it before it reruns a
    killed or SIGTERMed job, and the rerun must still take over the finished LoRA phase."""
    import shutil

    import duplus.train.lora as lora

    out = tmp_path / "out"
    _interrupted_in_full_ft(lora, store, base_file, out, monkeypatch)
    shutil.rmtree(out / "adapter", ignore_errors=True)
    with monkeypatch.context() as patch:
        metrics, calls = _run(lora, store, base_file, out, patch)
    assert metrics["resumed_phases"] == ["zero_shot", "lora"] and calls == ["full_ft"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and not (out / FOLDER).exists()


def test_a_changed_checkpoint_interval_keeps_the_journal(store, base_file, tmp_path, monkeypatch):
    import duplus.train.lora as lora

    out = tmp_path / "out"
    _interrupted_in_full_ft(lora, store, base_file, out, monkeypatch)
    config = _config()
    config["lora"]["checkpoint_every"] = 1  # bookkeeping only: not part of any key
    with monkeypatch.context() as patch:
        metrics, _ = _run(lora, store, base_file, out, patch, config=config)
    assert metrics["resumed_phases"] == ["zero_shot", "lora"]


def _copy_store(store, root):
    import shutil

    source = next(iter(store.values())).parent.parent
    shutil.copytree(source, root)
    return {name: root / path.parent.name / path.name for name, path in store.items()}


def test_data_count_by_content_not_by_place(store, base_file, tmp_path, monkeypatch):
    """A moved store resumes; a corrected training label redoes both trainings, not the zero-shot scores."""
    import shutil

    import numpy as np

    import duplus.train.lora as lora

    first = _copy_store(store, tmp_path / "first")
    out = tmp_path / "out"
    _interrupted_in_full_ft(lora, first, base_file, out, monkeypatch)
    moved = _copy_store(first, tmp_path / "moved")
    shutil.rmtree(tmp_path / "first")
    with monkeypatch.context() as patch:
        metrics, calls = _run(lora, moved, base_file, out, patch)
    assert metrics["resumed_phases"] == ["zero_shot", "lora"] and calls == ["full_ft"]

    out = tmp_path / "out2"
    _interrupted_in_full_ft(lora, moved, base_file, out, monkeypatch)
    train = pd.read_csv(moved["toy_ct"])
    row = train[(train["split"] == "train") & (train["center"] == "siteB")].iloc[0]
    label = moved["toy_ct"].parent / row["label"]
    np.save(label, np.zeros_like(np.load(label)))
    with monkeypatch.context() as patch:
        metrics, calls = _run(lora, moved, base_file, out, patch)
    assert metrics["resumed_phases"] == ["zero_shot"] and calls == ["lora", "full_ft"]


def _drop_a_field_of_the_lora_record(out):
    record_path = out / FOLDER / "lora.json"
    record = json.loads(record_path.read_text())
    del record["data"]["record"]["trainable"]
    record_path.write_text(json.dumps(record))


def _delete_the_adapter(out):
    import shutil

    shutil.rmtree(out / FOLDER / "lora_adapter")  # the journal's copy; adapter/ itself is the rule's output


@pytest.mark.parametrize("damage", [_drop_a_field_of_the_lora_record, _delete_the_adapter])
def test_a_damaged_lora_phase_is_done_again(damage, store, base_file, tmp_path, monkeypatch):
    """A record missing a field, or an adapter deleted since the phase finished: LoRA runs again."""
    import duplus.train.lora as lora

    out = tmp_path / "out"
    _interrupted_in_full_ft(lora, store, base_file, out, monkeypatch)
    damage(out)
    with monkeypatch.context() as patch:
        metrics, calls = _run(lora, store, base_file, out, patch)
    assert metrics["resumed_phases"] == ["zero_shot"] and calls == ["lora", "full_ft"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_lora_keeps_the_frozen_bases_batch_norm_statistics(store):
    """An adapter saves no statistics: LoRA training must not move the base's (``norm: batch``)."""
    from duplus.model import DuPLUS, ModelConfig

    def stats(model):
        return {n: b.clone() for n, b in model.named_buffers() if "running_" in n}

    cases = select_cases(read_manifests(store.values()), split="train", datasets=["toy_ct"], centers=["siteB"])
    sampler = PatchSampler(cases, PATCH)
    table = TextTable(FakePromptCache(), sampler.all_texts(), torch.device("cpu"))
    config = ModelConfig.from_config({"model": {"preset": "tiny", "overrides": {"norm": "batch"}}},
                                     text_dim=FakePromptCache().dim)
    kwargs = {"steps": 2, "batch_size": 2, "lr": 0.01, "seed": 1, "amp": None}
    torch.manual_seed(0)
    lora = DuPLUS(config)
    before = stats(lora)
    assert before
    add_adapter(lora, lora_config_from({**BASE_CONFIG["lora"], "rank": 2, "alpha": 4},
                                       lora_target_names(lora, ["encoder", "decoder"])), "siteB")
    finetune.fit(lora, sampler, table, **kwargs)
    after = {n.replace("base_model.model.", ""): b for n, b in stats(lora).items()}
    assert all(torch.equal(after[n], before[n]) for n in before)
    full = copy.deepcopy(DuPLUS(config))  # every weight trains: its statistics are its own to learn
    full_before = stats(full)
    finetune.fit(full, sampler, table, **kwargs)
    assert any(not torch.equal(stats(full)[n], full_before[n]) for n in full_before)
