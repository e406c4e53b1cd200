"""Checkpoints: exact round trip without pickle, atomic replacement, corrupt newest one skipped."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from duplus.errors import CheckpointError
from duplus.train.checkpoint import (
    RandomState,
    TrainState,
    Value,
    checkpoint_paths,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    save_checkpoint,
)


def _state(seed: int) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.9, 0.95))
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state()}, "step": seed, "log": [{"step": 1, "loss": 0.5}]}


def _assert_same(a, b):
    assert type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()) or set(a) == set(b)
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def test_round_trip_is_exact_and_keeps_key_types(tmp_path):
    state = _state(1)
    save_checkpoint(tmp_path, 5, state)
    loaded = load_checkpoint(tmp_path, 5)
    _assert_same(state, loaded)
    assert set(loaded["optimizer"]["state"]) == {0, 1, 2, 3}  # int parameter ids survive
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    # The optimizer accepts the restored state.
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    optimizer.load_state_dict(loaded["optimizer"])
    # No pickle anywhere: the record is plain JSON.
    _, json_path = checkpoint_paths(tmp_path, 5)
    assert json.loads(json_path.read_text(encoding="utf-8"))["data"]["step"] == 5  # a duplus.journal record


def test_keeps_newest_two(tmp_path):
    for step in (3, 6, 9, 12):
        save_checkpoint(tmp_path, step, _state(step))
    assert list_checkpoints(tmp_path) == [12, 9]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_00000009.json", "step_00000009.safetensors", "step_00000012.json", "step_00000012.safetensors"]


@pytest.mark.parametrize("damage", ["truncate_tensors", "truncate_json", "missing_tensors"])
def test_damaged_newest_checkpoint_falls_back_to_previous(tmp_path, damage):
    save_checkpoint(tmp_path, 3, _state(3))
    save_checkpoint(tmp_path, 6, _state(6))
    tensors, record = checkpoint_paths(tmp_path, 6)
    if damage == "truncate_tensors":
        tensors.write_bytes(tensors.read_bytes()[:-100])
    elif damage == "truncate_json":
        record.write_text(record.read_text(encoding="utf-8")[:50])
    else:
        tensors.unlink()
    with pytest.raises(CheckpointError, match="step_00000006"):
        load_checkpoint(tmp_path, 6)
    step, state = load_latest_checkpoint(tmp_path)
    assert step == 3
    _assert_same(state, _state(3))


def test_same_size_tampering_is_detected(tmp_path):
    save_checkpoint(tmp_path, 4, _state(4))
    tensors, _ = checkpoint_paths(tmp_path, 4)
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF
    tensors.write_bytes(bytes(data))
    assert load_latest_checkpoint(tmp_path) is None


def test_killed_write_leaves_previous_checkpoint_readable(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 2, _state(2))
    import duplus.journal as module  # checkpoints are journal records: the journal writes the record

    def die(*args, **kwargs):
        raise KeyboardInterrupt  # as if killed between the tensors and the record

    monkeypatch.setattr(module, "write_json", die)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 4, _state(4))
    assert checkpoint_paths(tmp_path, 4)[0].is_file()  # the tensors were written, their record was not
    step, _ = load_latest_checkpoint(tmp_path)
    assert step == 2


def test_a_checkpoint_written_before_checkpoints_were_journal_records_still_resumes(tmp_path):
    """A long run killed before an upgrade resumes after it: the earlier record (its own format, the
    tensors' sha256 beside the state) is read, and its tensors are still checked against it."""
    from safetensors.torch import save as safetensors_bytes

    weights = torch.arange(6, dtype=torch.float32)
    payload = safetensors_bytes({"t0": weights})
    tensors, record = checkpoint_paths(tmp_path, 7)
    tensors.write_bytes(payload)
    record.write_text(json.dumps({"format": "duplus-train-checkpoint/1", "step": 7, "tensors": tensors.name,
                                  "sha256": hashlib.sha256(payload).hexdigest(),
                                  "state": {"model": {"w": {"__tensor__": "t0"}}, "step": 7}}))
    step, state = load_latest_checkpoint(tmp_path)
    assert step == 7 and state["step"] == 7 and torch.equal(state["model"]["w"], weights)
    tensors.write_bytes(payload[:-4] + b"\0\0\0\0")
    with pytest.raises(CheckpointError, match="sha256 differs"):
        load_checkpoint(tmp_path, 7)


def test_empty_or_missing_folder_has_no_checkpoint(tmp_path):
    assert load_latest_checkpoint(tmp_path / "none") is None
    assert load_latest_checkpoint(tmp_path) is None


def test_rejects_values_that_would_need_pickle(tmp_path):
    with pytest.raises(CheckpointError, match="object"):
        save_checkpoint(tmp_path, 1, {"bad": object()})


def _trainer(seed: int, steps: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict]:
    """A small network and optimizer after ``steps`` steps on inputs drawn from torch's generator (with dropout)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.5), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    counters = {"steps": 0}
    for _ in range(steps):
        model(torch.randn(5, 4)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        counters["steps"] += 1
    return model, optimizer, counters


def _parts(model, optimizer, counters) -> TrainState:
    return TrainState({"model": model, "optimizer": optimizer,
                       "steps": Value(lambda: counters["steps"], lambda saved: counters.update(steps=saved)),
                       "rng": RandomState(torch.device("cpu"))})


def test_train_state_restores_what_it_saved_and_the_run_goes_on_identically(tmp_path):
    """Three steps, a checkpoint, two more, against a fresh trainer restored from that checkpoint."""
    model, optimizer, counters = _trainer(0, 3)
    save_checkpoint(tmp_path, 3, _parts(model, optimizer, counters).state_dict())
    straight = [model(torch.randn(5, 4)).sum().item() for _ in range(2)]

    other, other_optimizer, other_counters = _trainer(1, 0)  # other weights, other generator state
    _, saved = load_latest_checkpoint(tmp_path)
    _parts(other, other_optimizer, other_counters).load_state_dict(saved, tmp_path)
    assert other_counters["steps"] == 3
    assert set(other_optimizer.state_dict()["state"]) == set(optimizer.state_dict()["state"])
    assert [other(torch.randn(5, 4)).sum().item() for _ in range(2)] == straight  # weights and dropout stream


def test_train_state_names_every_part_a_checkpoint_lacks(tmp_path):
    model, optimizer, counters = _trainer(0, 1)
    saved = _parts(model, optimizer, counters).state_dict()
    del saved["optimizer"], saved["rng"]
    with pytest.raises(CheckpointError, match=r"lacks \['optimizer', 'rng'\]") as error:
        _parts(model, optimizer, counters).load_state_dict(saved, tmp_path / "checkpoints")
    assert str(tmp_path / "checkpoints") in str(error.value)
