"""Byte-reproducible safetensors: the same tensors and metadata always give the same file.

safetensors keeps the metadata in a Rust hash map whose order changes from call to call, so two
saves of identical adapters (or prompt caches) differ in their header bytes and in their sha256,
which the pipeline uses to bind adapters to their base and to tell finished work from stale. Here
the header is rewritten with the metadata sorted; the tensor data are left as written.
"""

from __future__ import annotations

import json
import struct
from typing import Mapping

import torch

_ALIGN = 8  # safetensors pads its header with spaces to a multiple of 8 bytes


def canonical(payload: bytes) -> bytes:
    """``payload`` (a safetensors file's bytes) with its metadata entries in sorted order."""
    (size,) = struct.unpack("<Q", payload[:8])
    header = json.loads(payload[8:8 + size])
    if "__metadata__" in header and isinstance(header["__metadata__"], dict):
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % _ALIGN)
    # One copy of the (possibly GB-sized) tensor data, not one per concatenation.
    return b"".join((struct.pack("<Q", len(text)), text, memoryview(payload)[8 + size:]))


def tensor_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """safetensors bytes of CPU copies of ``tensors``, reproducible to the byte (see the module docstring)."""
    from safetensors.torch import save

    state = {name: value.detach().contiguous().cpu() for name, value in tensors.items()}
    # No metadata rather than an empty map: safetensors writes an unreadable header for an empty
    # map beside zero tensors.
    return canonical(save(state, metadata=dict(metadata) if metadata else None))
