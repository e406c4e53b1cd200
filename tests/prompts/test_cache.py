"""Prompt cache: lookups, incremental rebuilds, encoder invalidation, atomic writes, free-text additions."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from prompt_helpers import FakeEncoder, install_module

from duplus.errors import PromptError
from duplus.prompts import cache as cache_module
from duplus.prompts.cache import PromptCache, build_prompt_cache, ensure_prompts, manifest_path, run_cache_prompts
from duplus.prompts.templates import target_prompts

TEXTS = target_prompts("CT", "liver") + target_prompts("CT", "liver tumor") + ["A computed tomography scan of the abdomen"]


@pytest.fixture
def path(tmp_path):
    return tmp_path / "prompts" / "minilm.safetensors"


def _snapshot(path):
    return path.read_bytes(), manifest_path(path).read_bytes()


def test_build_then_load_round_trips(path, fake_encoder):
    built = build_prompt_cache(TEXTS, fake_encoder, path)
    assert path.is_file() and manifest_path(path).name == "minilm.json" and manifest_path(path).is_file()
    cache = PromptCache.load(path)
    assert cache.texts == sorted(TEXTS) == built.texts
    assert cache.dim == 8 and cache.encoder_identity == "fake@000000000000"
    assert "A computed tomography scan of a liver." in cache and "nope" not in cache
    assert torch.equal(cache.get(TEXTS[0]), fake_encoder.vector(TEXTS[0]))
    stacked = cache.get_many(TEXTS[:3])
    assert stacked.shape == (3, 8) and torch.equal(stacked[2], fake_encoder.vector(TEXTS[2]))
    manifest = json.loads(manifest_path(path).read_text(encoding="utf-8"))
    assert manifest["texts"][TEXTS[0]] == cache_module.sha256_text(TEXTS[0])
    assert manifest["count"] == len(TEXTS) and manifest["created"]


def test_a_miss_names_the_text_and_the_fix(path, fake_encoder):
    build_prompt_cache(TEXTS, fake_encoder, path)
    with pytest.raises(PromptError, match=re.escape("'A computed tomography scan of a spleen.'")) as info:
        PromptCache.load(path).get_many([TEXTS[0], "A computed tomography scan of a spleen."])
    assert "cache_prompts" in str(info.value) and str(path) in str(info.value)


def test_all_texts_are_encoded_in_one_batched_pass(path, fake_encoder):
    build_prompt_cache(TEXTS + TEXTS[:2], fake_encoder, path)
    assert len(fake_encoder.calls) == 1
    assert sorted(fake_encoder.calls[0]) == sorted(TEXTS)


def test_rebuild_with_nothing_changed_encodes_and_writes_nothing(path, fake_encoder):
    build_prompt_cache(TEXTS, fake_encoder, path)
    before = _snapshot(path)
    again = FakeEncoder()
    cache = build_prompt_cache(list(reversed(TEXTS)), again, path)
    assert again.calls == [] and _snapshot(path) == before
    assert cache.texts == sorted(TEXTS)


def test_adding_a_template_encodes_only_the_new_text(path, fake_encoder):
    build_prompt_cache(TEXTS, fake_encoder, path)
    second = FakeEncoder()
    new = "A Magnetic Resonance Imaging scan of a liver."
    build_prompt_cache(TEXTS + [new], second, path)
    assert second.calls == [[new]]
    assert PromptCache.load(path).texts == sorted(TEXTS + [new])


def test_removed_texts_are_pruned_without_encoding(path, fake_encoder):
    build_prompt_cache(TEXTS, fake_encoder, path)
    second = FakeEncoder()
    cache = build_prompt_cache(TEXTS[:4], second, path)
    assert second.calls == [] and PromptCache.load(path).texts == sorted(TEXTS[:4]) == cache.texts


def test_a_different_encoder_identity_invalidates_every_entry(path, fake_encoder):
    build_prompt_cache(TEXTS, fake_encoder, path)
    other = FakeEncoder(identity="other@111111111111", dim=4)
    cache = build_prompt_cache(TEXTS, other, path)
    assert sorted(other.encoded) == sorted(TEXTS)
    loaded = PromptCache.load(path)
    assert loaded.encoder_identity == "other@111111111111" and loaded.dim == 4 == cache.dim
    assert torch.equal(loaded.get(TEXTS[0]), other.vector(TEXTS[0]))


def test_real_encoder_one_pass_and_cached_equals_fresh(path, minilm):
    texts = TEXTS[:10]
    forwards = []
    encodes = []
    original = minilm.encode
    handle = minilm.model.register_forward_hook(lambda module, args, output: forwards.append(1))
    try:
        minilm.encode = lambda t, batch_size=64: encodes.append(list(t)) or original(t, batch_size=batch_size)
        build_prompt_cache(texts, minilm, path, batch_size=4)
    finally:
        handle.remove()
        del minilm.encode
    assert len(encodes) == 1 and len(forwards) == 3  # 10 texts, batches of 4
    cache = PromptCache.load(path)
    assert cache.dim == 384 and cache.encoder_identity == minilm.identity
    fresh = minilm.encode(texts, batch_size=1)
    assert torch.allclose(cache.get_many(texts), fresh, atol=1e-6)


def test_a_write_that_fails_midway_leaves_the_old_cache_intact(path, fake_encoder, monkeypatch):
    build_prompt_cache(TEXTS, fake_encoder, path)
    before = _snapshot(path)
    real_write = Path.write_bytes

    def dying_write(self, data):
        if self.name.endswith(".safetensors"):
            real_write(self, data[:40])  # a truncated header
            raise OSError("disk full")
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", dying_write)
    with pytest.raises(OSError, match="disk full"):
        build_prompt_cache(TEXTS + ["A new prompt."], FakeEncoder(), path)
    assert _snapshot(path) == before
    assert [p.name for p in path.parent.iterdir() if ".tmp" in p.name] == []
    assert PromptCache.load(path).texts == sorted(TEXTS)


def test_a_truncated_temp_file_from_a_killed_writer_is_never_read(path, fake_encoder):
    build_prompt_cache(TEXTS, fake_encoder, path)
    leftover = path.parent / f".{path.name}.abc123.tmp.safetensors"
    leftover.write_bytes(path.read_bytes()[:40])
    assert PromptCache.load(path).texts == sorted(TEXTS)
    second = FakeEncoder()
    build_prompt_cache(TEXTS + ["A new prompt."], second, path)
    assert second.calls == [["A new prompt."]] and "A new prompt." in PromptCache.load(path)


def test_a_stale_manifest_is_an_error_for_readers_and_repaired_by_the_next_build(path, fake_encoder, monkeypatch):
    build_prompt_cache(TEXTS, fake_encoder, path)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the writer dies after the tensors were renamed into place

    monkeypatch.setattr(cache_module, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        build_prompt_cache(TEXTS + ["A new prompt."], FakeEncoder(), path)
    monkeypatch.undo()
    with pytest.raises(PromptError, match="disagree") as info:
        PromptCache.load(path)
    assert str(manifest_path(path)) in str(info.value)
    third = FakeEncoder()
    build_prompt_cache(TEXTS + ["A new prompt."], third, path)
    assert third.calls == []  # the complete tensors file was reused; only the manifest was rewritten
    assert "A new prompt." in PromptCache.load(path)


def test_missing_or_corrupt_files_are_named(path, fake_encoder):
    with pytest.raises(PromptError, match=re.escape(str(path))):
        PromptCache.load(path)
    build_prompt_cache(TEXTS, fake_encoder, path)
    manifest = manifest_path(path)
    saved = manifest.read_text(encoding="utf-8")
    manifest.unlink()
    with pytest.raises(PromptError, match=re.escape(str(manifest))):
        PromptCache.load(path)
    edited = json.loads(saved)
    edited["texts"]["A forged prompt."] = "0" * 64
    manifest.write_text(json.dumps(edited))
    with pytest.raises(PromptError, match="disagree"):
        PromptCache.load(path)
    manifest.write_text(saved)
    path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    with pytest.raises(PromptError, match=re.escape(str(path)) + ".*(corrupt|truncated)"):
        PromptCache.load(path)


@pytest.mark.parametrize("damage", [
    lambda good: good[:5],                                          # shorter than the length field
    lambda good: (10**9).to_bytes(8, "little") + good[8:],          # header longer than the file
    lambda good: (2).to_bytes(8, "little") + b"[]" + good[10:],     # header not a JSON object
    lambda good: good[:8] + b"\xff" + good[9:],                     # header not UTF-8 JSON
])
def test_a_damaged_header_is_named_as_corrupt(path, fake_encoder, damage):
    build_prompt_cache(TEXTS, fake_encoder, path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(PromptError, match=re.escape(str(path)) + ".*(corrupt|truncated)"):
        PromptCache.load(path)


def test_tensors_replaced_while_loading_never_pass_for_the_manifests(path, fake_encoder, monkeypatch):
    """A writer swaps in new tensors (before its manifest) just after the reader opened the file:
    the reader gets what the manifest vouches for, never the new tensors under the old hash."""
    import io

    from safetensors import safe_open
    from safetensors.torch import save_file

    build_prompt_cache(TEXTS, fake_encoder, path)
    expected = PromptCache.load(path).vectors()
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        newer = {key: handle.get_tensor(key) + 1.0 for key in handle.keys()}
    real_open = open
    swapped: list[bool] = []

    def open_then_swap(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if swapped or not isinstance(file, (str, os.PathLike)) or os.fspath(file) != str(path):
            return handle
        with handle:
            snapshot = handle.read()
        swapped.append(True)
        save_file(newer, str(path), metadata=meta)  # the writer's tensors rename, manifest not yet
        return io.BytesIO(snapshot)

    monkeypatch.setattr("builtins.open", open_then_swap)
    monkeypatch.setattr("io.open", open_then_swap)
    try:
        loaded = PromptCache.load(path).vectors()
    finally:
        monkeypatch.undo()
    assert swapped
    assert all(torch.equal(loaded[text], expected[text]) for text in expected)


def test_ensure_prompts_adds_free_text_and_loads_the_encoder_only_when_needed(path, fake_encoder):
    build_prompt_cache(TEXTS, fake_encoder, path)
    made = []

    def factory():
        made.append(1)
        return FakeEncoder()

    assert ensure_prompts(path, TEXTS[:2], factory).texts == sorted(TEXTS) and made == []
    cache = ensure_prompts(path, ["A computed tomography scan of a gallbladder polyp."], factory)
    assert made == [1] and "A computed tomography scan of a gallbladder polyp." in cache
    assert PromptCache.load(path).texts == sorted(TEXTS + ["A computed tomography scan of a gallbladder polyp."])


def test_ensure_prompts_refuses_another_encoder(path, fake_encoder):
    build_prompt_cache(TEXTS, fake_encoder, path)
    with pytest.raises(PromptError, match="fake@000000000000.*other@222222222222: another encoder.*'A new prompt.'"):
        ensure_prompts(path, ["A new prompt."], FakeEncoder(identity="other@222222222222"))
    # Same name, other hash: not "use another source" but other weights or settings of this one.
    with pytest.raises(PromptError, match="same encoder with other weights or settings"):
        ensure_prompts(path, ["A new prompt."], FakeEncoder(identity="fake@333333333333"))


def test_ensure_prompts_on_a_read_only_cache_keeps_new_prompts_in_memory(path, fake_encoder, monkeypatch, caplog):
    build_prompt_cache(TEXTS, fake_encoder, path)
    before = _snapshot(path)

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path.parent))

    monkeypatch.setattr(cache_module, "write_bytes", read_only)
    cache = ensure_prompts(path, ["A new prompt."], FakeEncoder())
    assert "A new prompt." in cache and torch.equal(cache.get(TEXTS[0]), fake_encoder.vector(TEXTS[0]))
    assert _snapshot(path) == before
    assert "cannot add 1 prompts" in caplog.text


def test_run_cache_prompts_builds_the_runs_cache(tmp_path, monkeypatch, specs, fake_encoder):
    from duplus.prompts import encoder as encoder_module

    install_module(monkeypatch, "registry", enabled_datasets=lambda config: specs)
    chosen = []
    monkeypatch.setattr(encoder_module, "encoder_from_config", lambda config, device="cpu": chosen.append(config) or fake_encoder)
    config = {"device": "cpu", "prompts": {"source": "minilm", "pooling": "auto", "batch_size": 16, "paraphrases": False}}
    out = tmp_path / "results" / "prompts" / "minilm.safetensors"
    run_cache_prompts(config, str(out))
    cache = PromptCache.load(out)
    assert len(cache) == 4 * 2 + 4 * 4 and chosen == [config]
    assert "A T2-weighted Magnetic Resonance Imaging scan of the abdomen" in cache
    assert len(fake_encoder.calls) == 1


def test_ensure_prompts_without_persist_never_writes(path, fake_encoder):
    """`duplus segment` reads the pipeline's cache: a rewritten file would rerun every stage after it."""
    build_prompt_cache(TEXTS, fake_encoder, path)
    before = _snapshot(path)
    files = sorted(p.name for p in path.parent.iterdir())
    cache = ensure_prompts(path, ["A new prompt."], FakeEncoder(), persist=False)
    assert "A new prompt." in cache and torch.equal(cache.get(TEXTS[0]), fake_encoder.vector(TEXTS[0]))
    assert _snapshot(path) == before and sorted(p.name for p in path.parent.iterdir()) == files
    alone = ensure_prompts(path.parent / "absent" / "cache.safetensors", ["A new prompt."], FakeEncoder(), persist=False)
    assert alone.texts == ["A new prompt."] and not (path.parent / "absent").exists()


def test_the_same_weights_in_another_folder_are_the_same_encoder(path, fake_encoder):
    from duplus.prompts.cache import same_encoder

    build_prompt_cache(TEXTS, FakeEncoder(identity="ClipMD@0123456789ab"), path)
    cache = ensure_prompts(path, ["A new prompt."], FakeEncoder(identity="clipmd-copy@0123456789ab"))
    assert "A new prompt." in cache
    assert same_encoder("a@0123456789ab", "b@0123456789ab") and not same_encoder("a@0123456789ab", "a@ffffffffffff")


class _NegatedEncoder(FakeEncoder):
    """Same identity, other vectors: tensors the manifest beside them must not be taken to vouch for."""

    def vector(self, text: str) -> torch.Tensor:
        return -super().vector(text)


def _tensors_without_their_manifest(path):
    """A cache whose manifest vouches for other tensors than the ones beside it (another write's)."""
    build_prompt_cache(TEXTS, _NegatedEncoder(), path)
    manifest = json.loads(manifest_path(path).read_text(encoding="utf-8"))
    manifest["tensors_sha256"] = "0" * 64
    manifest_path(path).write_text(json.dumps(manifest), encoding="utf-8")


def test_ensure_prompts_rebuilds_a_cache_whose_manifest_disagrees(path, caplog):
    _tensors_without_their_manifest(path)
    encoder = FakeEncoder()
    cache = ensure_prompts(path, TEXTS[:1], encoder)
    assert sorted(encoder.encoded) == sorted(TEXTS)  # every text encoded again, none taken from the tensors
    assert all(torch.equal(cache.get(text), encoder.vector(text)) for text in TEXTS)
    assert str(manifest_path(path)) in caplog.text and "tensors sha256" in caplog.text
    rebuilt = PromptCache.load(path)  # the manifest agrees again
    assert torch.equal(rebuilt.get(TEXTS[0]), encoder.vector(TEXTS[0]))


def test_ensure_prompts_without_persist_encodes_a_disagreeing_cache_again_in_memory(path, caplog):
    _tensors_without_their_manifest(path)
    before = _snapshot(path)
    encoder = FakeEncoder()
    cache = ensure_prompts(path, ["A new prompt."], encoder, persist=False)
    assert all(torch.equal(cache.get(text), encoder.vector(text)) for text in [*TEXTS, "A new prompt."])
    assert _snapshot(path) == before and "for this run only" in caplog.text


def test_ensure_prompts_refuses_a_disagreeing_cache_it_cannot_encode_again(path):
    _tensors_without_their_manifest(path)
    with pytest.raises(PromptError, match=f"{re.escape(str(path))} was made by fake@000000000000.*disagree"):
        ensure_prompts(path, TEXTS[:1], FakeEncoder(identity="other@222222222222"))
