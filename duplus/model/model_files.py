"""Model files: safetensors weights plus a ``model.json`` sidecar (config, encoder, sha256, meta).

Loading verifies the hash before anything is deserialised and never unpickles arbitrary objects.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from duplus import __version__
from duplus.atomic import write_bytes, write_json
from duplus.errors import CheckpointError, ModelError
from duplus.model.config import ModelConfig
from duplus.model.duplus import DuPLUS, count_parameters
from duplus.model.task_specific import ARCHITECTURE as TASK_SPECIFIC
from duplus.model.task_specific import TaskSpecificNet

FORMAT = "duplus-model/1"
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")
# Keys of the sidecar written by save_model; a caller's meta cannot override them.
RESERVED = ("format", "duplus_version", "config", "weights", "sha256", "bytes", "params", "text_dim", "architecture",
            "head_classes")
UNIVERSAL = "duplus"


def architecture_of(model: torch.nn.Module) -> str:
    """``duplus`` (the universal, prompt-driven network) or ``task_specific`` (the baseline)."""
    return TASK_SPECIFIC if isinstance(model, TaskSpecificNet) else UNIVERSAL


def sidecar_path(path: str | os.PathLike) -> Path:
    """``results/pretrain/model.safetensors`` -> ``results/pretrain/model.json``."""
    return Path(path).with_suffix(".json")


def save_model(model: torch.nn.Module, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write weights (atomic) and then the sidecar (atomic); returns the sidecar dict.

    ``meta`` is stored as given (e.g. ``text_encoder``, ``label_map``, ``classes``, ``steps``) next
    to the reserved keys ``config``, ``sha256``, ``weights``, ``bytes``, ``params``, ``text_dim``.
    """
    if not isinstance(model, (DuPLUS, TaskSpecificNet)):
        raise ModelError(f"save_model expects a DuPLUS network, got {type(model).__name__} (merge adapters first)")
    target = Path(path)
    if target.suffix != ".safetensors":
        raise ModelError(f"{target}: model weights are written as .safetensors")
    from duplus.tensorfile import tensor_bytes

    payload = tensor_bytes(model.state_dict(), {"format": FORMAT})
    # The hash is of the bytes written, not of the file re-read: another writer may replace it.
    write_bytes(target, payload)
    sidecar = dict(meta or {})
    sidecar.update(
        format=FORMAT,
        duplus_version=__version__,
        config=model.cfg.to_dict(),
        weights=target.name,
        sha256=hashlib.sha256(payload).hexdigest(),
        bytes=len(payload),
        params=count_parameters(model),
        text_dim=model.cfg.text_dim,
        architecture=architecture_of(model),
    )
    if isinstance(model, TaskSpecificNet):
        sidecar["head_classes"] = list(model.classes)
    # Weights first, sidecar second: a sidecar never points to weights that are not complete.
    write_json(sidecar_path(target), sidecar)
    return sidecar


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    """The sidecar of a weights file, with a clear error when it is missing or malformed."""
    side = sidecar_path(path)
    if not side.is_file():
        raise CheckpointError(
            f"{path}: its sidecar {side.name} is missing; a model file needs the JSON written beside it by save_model"
        )
    try:
        sidecar = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{side}: unreadable model sidecar ({error})") from error
    for key in ("config", "sha256"):
        if key not in sidecar:
            raise CheckpointError(f"{side}: model sidecar lacks '{key}'")
    return sidecar


def load_model(
    path: str | os.PathLike,
    expected_sha256: str | None = None,
    device: str | torch.device = "cpu",
    architectures: tuple[str, ...] = (UNIVERSAL,),
) -> tuple[DuPLUS, dict[str, Any]]:
    """Load a DuPLUS model; returns (model in eval mode on ``device``, sidecar dict).

    ``architectures`` lists the kinds the caller can use: only the universal network by default, so
    a task-specific baseline given where prompts are needed is refused by name.

    Raises ``CheckpointError`` naming the file when it is missing, truncated, altered (hash differs
    from the sidecar or from ``expected_sha256``), or an untrusted pickle.
    """
    weights = Path(path)
    if not weights.is_file():
        raise CheckpointError(f"{weights}: model weights not found")
    sidecar = read_sidecar(weights)
    try:
        payload = weights.read_bytes()
    except OSError as error:
        raise CheckpointError(f"{weights}: unreadable model weights ({error})") from error
    # Hash and parse the same bytes: a concurrent writer cannot slip other weights in between.
    actual = hashlib.sha256(payload).hexdigest()
    if actual != sidecar["sha256"]:
        raise CheckpointError(
            f"{weights}: sha256 {actual[:12]}... differs from {sidecar_path(weights).name} "
            f"({str(sidecar['sha256'])[:12]}...): the file is truncated or was replaced"
        )
    if expected_sha256 and actual.lower() != expected_sha256.strip().lower():
        raise CheckpointError(f"{weights}: sha256 {actual} does not match the expected {expected_sha256.strip()}")
    saved = dict(sidecar["config"])
    # Parameter shapes are the same either way: a model saved before the field existed must not be
    # rebuilt with the group norm it was never trained with.
    saved.setdefault("controller_norm", "instance")
    cfg = ModelConfig.from_dict(saved, where=f"{sidecar_path(weights)}:config")
    architecture = str(sidecar.get("architecture", UNIVERSAL))
    if architecture not in architectures:
        raise ModelError(
            f"{weights}: is a {architecture!r} network; here only {list(architectures)} can be used"
            + (" (a task-specific baseline has no prompts)" if architecture == TASK_SPECIFIC else "")
        )
    state = _read_state(weights, payload)
    if architecture == TASK_SPECIFIC:
        model: torch.nn.Module = TaskSpecificNet(cfg, list(sidecar.get("head_classes") or []))
    else:
        model = DuPLUS(cfg)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # tensors of another shape than the sidecar's network has
        first = str(error).strip().splitlines()
        raise ModelError(f"{weights}: weights do not fit the model in its sidecar ({first[-1].strip() if first else error})"
                         ) from None
    if missing or unexpected:
        raise ModelError(
            f"{weights}: weights do not fit the model in its sidecar "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    return model.to(device).eval(), sidecar


def _read_state(weights: Path, payload: bytes) -> dict[str, torch.Tensor]:
    if weights.suffix in PICKLE_SUFFIXES:
        # Pickles can run code when loaded; only plain tensor dicts pass weights_only.
        try:
            state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unpickling failure means "untrusted"
            raise CheckpointError(
                f"{weights}: refused to load a pickle file that is not a plain tensor dict ({type(error).__name__}); "
                "use .safetensors"
            ) from error
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{weights}: pickle file does not hold a plain tensor state dict")
        return state
    from safetensors import SafetensorError
    from safetensors.torch import load as parse

    try:
        return parse(payload)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({error})") from error


def with_trained_window(config: Mapping[str, Any], sidecar: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with ``pretrain.patch_size`` set to the window the model was trained on.

    Sliding-window inference must use the training window (the model never saw another size);
    a config edited since training, or another run's config, must not change it silently. Models
    whose sidecar records no window keep the config's.
    """
    trained = sidecar.get("patch_size")
    if not trained:
        return dict(config)
    return {**config, "pretrain": {**(config.get("pretrain") or {}), "patch_size": [int(v) for v in trained]}}
