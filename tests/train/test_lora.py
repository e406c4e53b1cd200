"""LoRA: small trainable share, frozen base untouched, adapter files bound to their base, switching, merging."""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest
import torch

from duplus.errors import CheckpointError, ConfigError
from duplus.hashing import sha256_file
from duplus.model import DuPLUS, ModelConfig, load_model, lora_target_names, save_model
from duplus.train.adapters import (
    add_adapter,
    adapter_names,
    load_adapter,
    lora_config_from,
    merge_adapter,
    save_adapter,
    set_adapter,
)
from duplus.train.batches import TextTable
from duplus.train.cases import read_manifests, select_cases
from duplus.train.finetune import fit
from duplus.train.sampling import PatchSampler

from .conftest import BASE_CONFIG, PATCH, FakePromptCache

TARGETS = ["encoder", "decoder", "film", "controller"]
SETTINGS = {**BASE_CONFIG["lora"], "rank": 1, "alpha": 2}


def _base(seed: int) -> DuPLUS:
    torch.manual_seed(seed)
    return DuPLUS(ModelConfig.from_config({"model": {"preset": "tiny"}}, text_dim=FakePromptCache().dim)).eval()


@pytest.fixture(scope="module")
def base_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "model.safetensors"
    save_model(_base(0), path, meta={"patch_size": PATCH})
    return path


@pytest.fixture(scope="module")
def center_data(store):
    cases = select_cases(read_manifests(store.values()), split="train", datasets=["toy_ct"], centers=["siteB"])
    sampler = PatchSampler(cases, PATCH)
    table = TextTable(FakePromptCache(), sampler.all_texts(), torch.device("cpu"))
    return sampler, table


@pytest.fixture(scope="module")
def adapted(base_file, center_data):
    """The base model with one adapter trained for 3 steps, plus its pristine copy."""
    base, _ = load_model(base_file)
    model = copy.deepcopy(base)
    config = lora_config_from(SETTINGS, lora_target_names(model, TARGETS))
    trainable = add_adapter(model, config, "siteB")
    sampler, table = center_data
    fit(model, sampler, table, steps=3, batch_size=2, lr=0.01, seed=1, amp=None)
    return base, model, config, trainable


def _inputs(seed=5):
    g = torch.Generator().manual_seed(seed)
    dim = FakePromptCache().dim
    return (torch.randn(1, 1, *PATCH, generator=g), torch.tensor([0]), torch.randn(1, dim, generator=g),
            torch.randn(1, 2, dim, generator=g))


def _out(model):
    with torch.no_grad():
        return model.eval()(*_inputs())


def test_paper_model_lora_share_is_small(tmp_path):
    torch.manual_seed(0)
    model = DuPLUS(ModelConfig.from_config({"model": {"preset": "paper"}}, text_dim=512))
    total = sum(p.numel() for p in model.parameters())
    trainable = add_adapter(model, lora_config_from({"rank": 4, "alpha": 8}, lora_target_names(model, TARGETS)), "c")
    assert 0 < trainable < 0.03 * total
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    # The adapter file against the full checkpoint (float32 safetensors: 4 bytes a parameter).
    config = lora_config_from({"rank": 4, "alpha": 8}, lora_target_names(model, TARGETS))
    weights = save_adapter(model, "c", config, tmp_path / "adapter", base_sha256="0" * 64)
    adapter_bytes = weights.stat().st_size
    assert 0 < adapter_bytes < 0.05 * 4 * total


def test_only_adapter_trains_and_base_stays_bit_identical(adapted):
    base, model, _, trainable = adapted
    assert trainable < 0.05 * sum(p.numel() for p in base.parameters())
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    adapted_state = model.state_dict()
    for name, value in base.state_dict().items():
        key = name if name in adapted_state else name.replace(name.rsplit(".", 1)[0], name.rsplit(".", 1)[0] + ".base_layer")
        assert torch.equal(adapted_state[key], value), name
    lora_b = [v for k, v in adapted_state.items() if "lora_B" in k]
    assert any(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: training moved it
    assert not torch.equal(_out(model), _out(base))


def test_adapter_round_trip_gives_identical_outputs(adapted, base_file, tmp_path):
    _, model, config, _ = adapted
    sha = sha256_file(base_file)
    save_adapter(model, "siteB", config, tmp_path / "adapter", sha)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))["peft_type"] == "LORA"
    fresh, _ = load_model(base_file)
    name = load_adapter(fresh, tmp_path / "adapter", sha)
    assert name == "siteB" and adapter_names(fresh) == ["siteB"]
    assert torch.equal(_out(fresh), _out(model))
    # Loading is for inference: the adapter is frozen, the base's own flags are left alone.
    assert not any(p.requires_grad for n, p in fresh.named_parameters() if "lora_" in n)


def test_adapter_on_another_base_is_refused(adapted, base_file, tmp_path):
    _, model, config, _ = adapted
    save_adapter(model, "siteB", config, tmp_path / "adapter", sha256_file(base_file))
    other = tmp_path / "other.safetensors"
    save_model(_base(1), other)
    fresh, _ = load_model(other)
    with pytest.raises(CheckpointError, match="trained on base weights"):
        load_adapter(fresh, tmp_path / "adapter", sha256_file(other))
    assert adapter_names(fresh) == []


def test_two_adapters_switch(adapted, base_file, center_data, tmp_path):
    _, model, config, _ = adapted
    sha = sha256_file(base_file)
    save_adapter(model, "siteB", config, tmp_path / "b", sha)
    second = copy.deepcopy(adapted[0])
    add_adapter(second, config, "other")
    sampler, table = center_data
    fit(second, sampler, table, steps=2, batch_size=2, lr=0.05, seed=9, amp=None)
    save_adapter(second, "other", config, tmp_path / "o", sha)

    shared, _ = load_model(base_file)
    load_adapter(shared, tmp_path / "b", sha)
    load_adapter(shared, tmp_path / "o", sha)
    assert adapter_names(shared) == ["other", "siteB"]
    out_other = _out(shared)  # the adapter loaded last is active
    set_adapter(shared, "siteB")
    out_b = _out(shared)
    assert torch.equal(out_b, _out(model)) and torch.equal(out_other, _out(second))
    assert not torch.equal(out_b, out_other)
    with pytest.raises(Exception, match="no adapter named"):
        set_adapter(shared, "missing")


def test_merge_gives_standalone_model_with_same_outputs(adapted, tmp_path):
    _, model, _, _ = adapted
    expected = _out(model)
    merged = merge_adapter(copy.deepcopy(model))
    assert isinstance(merged, DuPLUS) and adapter_names(merged) == []
    assert not any("lora_" in n or "base_layer" in n for n, _ in merged.named_parameters())
    assert torch.allclose(_out(merged), expected, atol=1e-5)
    save_model(merged, tmp_path / "merged.safetensors")
    reloaded, _ = load_model(tmp_path / "merged.safetensors")
    assert torch.allclose(_out(reloaded), expected, atol=1e-5)


def test_run_lora_writes_adapter_meta_and_metrics(store, base_file, tmp_path, monkeypatch):
    import duplus.train.lora as lora

    scores = iter([0.5, 0.7, 0.8])  # zero-shot, LoRA, full fine-tuning

    def fake_evaluate(model, rows, cache, config, manifest_dir):
        assert set(rows["split"]) == {"test"} and set(rows["center"]) == {"siteB"}
        assert (manifest_dir / rows["image"].iloc[0]).is_file()
        value = next(scores)
        return pd.DataFrame([{"dataset": r["dataset"], "case": r["case"], "center": r["center"], "class": c,
                              "dice": value, "hd95": 1.0, "nsd": value} for _, r in rows.iterrows()
                             for c in ("liver", "spleen")])

    monkeypatch.setattr(lora, "_evaluate", fake_evaluate)
    config = copy.deepcopy(BASE_CONFIG)
    config["lora"]["rank"] = 1
    out = tmp_path / "ct_siteB"
    metrics = lora.run_lora(config, "ct_siteB", list(store.values()), FakePromptCache(), base_file, out)
    on_disk = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert on_disk == json.loads(json.dumps(metrics))
    for key in ("center", "dataset", "zero_shot_dice", "lora_dice", "full_ft_dice", "gap_closed",
                "trainable_params_lora", "trainable_params_full", "total_params", "adapter_bytes",
                "checkpoint_bytes", "seconds_lora", "seconds_full", "peak_rss_mb_lora", "peak_rss_mb_full", "per_class"):
        assert key in on_disk, key
    assert on_disk["gap_closed"] == pytest.approx((0.7 - 0.5) / (0.8 - 0.5))
    assert on_disk["trainable_params_lora"] < 0.05 * on_disk["total_params"] == 0.05 * on_disk["trainable_params_full"]
    assert on_disk["per_class"]["liver"] == {"zero_shot": 0.5, "lora": 0.7, "full_ft": 0.8}
    meta = json.loads((out / "adapter_meta.json").read_text(encoding="utf-8"))
    assert meta["base_sha256"] == sha256_file(base_file) and meta["center"] == "ct_siteB"
    assert meta["label_map"] == {"1": "liver", "2": "liver tumor", "3": "spleen"}
    assert meta["target_modules"] and all(not t.startswith("stems") for t in meta["target_modules"])
    assert on_disk["adapter_bytes"] == (out / "adapter" / "adapter_model.safetensors").stat().st_size
    fresh, _ = load_model(base_file)
    assert load_adapter(fresh, out / "adapter", meta["base_sha256"]) == "ct_siteB"


def test_unknown_center_is_a_config_error(store, base_file, tmp_path):
    from duplus.train.lora import run_lora

    with pytest.raises(ConfigError, match="lora.centers.nowhere"):
        run_lora(copy.deepcopy(BASE_CONFIG), "nowhere", list(store.values()), FakePromptCache(), base_file, tmp_path)
