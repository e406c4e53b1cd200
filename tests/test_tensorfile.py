"""safetensors files are reproducible to the byte: equal tensors and metadata give an equal sha256."""

from __future__ import annotations

import hashlib

import torch
from safetensors import safe_open
from safetensors.torch import load, save

from duplus.atomic import save_safetensors
from duplus.tensorfile import canonical, tensor_bytes

TENSORS = {"b": torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), "a": torch.arange(5),
           "c.x": torch.zeros(2, dtype=torch.bfloat16)}
# Several entries: safetensors' own header order of these changes between calls in one process.
METADATA = {"format": "duplus-lora/1", "step": "3", "base_sha256": "ab" * 32, "note": "é\"\\\n"}


def test_equal_inputs_give_equal_bytes_in_one_process():
    digests = {hashlib.sha256(tensor_bytes(TENSORS, METADATA)).hexdigest() for _ in range(20)}
    assert len(digests) == 1


def test_the_file_reads_back_with_the_safetensors_reader(tmp_path):
    path = tmp_path / "x.safetensors"
    save_safetensors(path, TENSORS, METADATA)
    with safe_open(str(path), framework="pt") as handle:
        assert dict(handle.metadata()) == METADATA
        assert all(torch.equal(handle.get_tensor(k), v) for k, v in TENSORS.items())
    assert path.read_bytes() == tensor_bytes(TENSORS, METADATA)


def test_canonical_keeps_a_header_in_order_and_the_data_untouched():
    single = save(TENSORS, metadata={"format": "x"})
    assert canonical(single) == single
    rewritten = canonical(save(TENSORS, metadata=METADATA))
    assert all(torch.equal(load(rewritten)[k], v) for k, v in TENSORS.items())
    assert int.from_bytes(rewritten[:8], "little") % 8 == 0  # the header keeps safetensors' alignment
