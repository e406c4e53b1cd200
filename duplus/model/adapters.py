"""LoRA adapters on a DuPLUS network with peft: inject, freeze, save, load (bound to one base), switch, merge.

An adapter folder: ``adapter_model.safetensors`` (metadata: sha256 of its base) + ``adapter_config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn

from duplus.atomic import replace_folder, save_safetensors, write_json
from duplus.errors import CheckpointError, ConfigError, ModelError
from duplus.hashing import sha256_file
from duplus.settings import Lora, Settings

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "duplus-lora/1"


def lora_config_from(settings: Mapping[str, Any] | Lora, target_modules: Sequence[str]) -> LoraConfig:
    """peft ``LoraConfig`` from ``config["lora"]`` (rank, alpha, dropout, modules_to_save; typed, or as written)."""
    lora = settings if isinstance(settings, Lora) else Settings.of({"lora": dict(settings)}).lora
    if not target_modules:
        raise ConfigError(f"lora.targets {list(lora.targets)} select no Conv3d/Linear module of the model")
    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(target_modules),
        modules_to_save=list(lora.modules_to_save) or None,
    )


def _is_adapter_param(name: str, adapter: str) -> bool:
    return any(f".{kind}.{adapter}." in f".{name}" for kind in ("lora_A", "lora_B", "modules_to_save"))


def freeze_except_adapter(model: nn.Module, adapter: str) -> int:
    """Train only ``adapter``'s parameters; returns how many values that is."""
    trainable = 0
    for name, param in model.named_parameters():
        param.requires_grad_(_is_adapter_param(name, adapter))
        trainable += param.numel() if param.requires_grad else 0
    return trainable


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters injected into ``model``."""
    names: set[str] = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            names.update(module.lora_A.keys() if hasattr(module, "lora_A") else ())
    return sorted(names)


def add_adapter(model: nn.Module, lora_config: LoraConfig, adapter: str) -> int:
    """Inject a new LoRA adapter, make it the active one and the only trainable part; returns its size."""
    if adapter in adapter_names(model):
        raise ModelError(f"the model already has an adapter named {adapter!r}")
    with warnings.catch_warnings():
        # peft warns that a second adapter joins the first: that is what we want.
        warnings.filterwarnings("ignore", message=".*peft_config.*")
        inject_adapter_in_model(lora_config, model, adapter_name=adapter)
    set_adapter(model, adapter)
    return freeze_except_adapter(model, adapter)


def set_adapter(model: nn.Module, adapter: str) -> None:
    """Make ``adapter`` the active adapter of every LoRA layer; trainability is left as it was."""
    if adapter not in adapter_names(model):
        raise ModelError(f"no adapter named {adapter!r} in the model (has {adapter_names(model)})")
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for module in model.modules():
        if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
            module.set_adapter(adapter)
    for name, param in model.named_parameters():
        param.requires_grad_(flags.get(name, False))


def _plain_json(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, dict):
        return {k: _plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_json(v) for v in value]
    if hasattr(value, "value") and isinstance(value.value, str):  # peft enums
        return value.value
    return value


def save_adapter(model: nn.Module, adapter: str, lora_config: LoraConfig, folder: str | os.PathLike, base_sha256: str) -> Path:
    """Write ``folder`` (weights + config) atomically as a whole; returns the weights file."""
    target = Path(folder)
    state = get_peft_model_state_dict(model, adapter_name=adapter)
    if not state:
        raise ModelError(f"adapter {adapter!r} has no weights to save")
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    write_json(staging / CONFIG_NAME, _plain_json(lora_config.to_dict()))
    # The config (alpha, rsLoRA: the scaling) changes predictions as much as the weights do: the
    # weights' metadata binds it, so an edited or swapped config is refused on load.
    meta = {"format": FORMAT, "base_sha256": base_sha256, "adapter_name": adapter,
            "config_sha256": sha256_file(staging / CONFIG_NAME)}
    save_safetensors(staging / WEIGHTS_NAME, state, metadata=meta)
    replace_folder(staging, target)
    return target / WEIGHTS_NAME


def read_adapter(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str], LoraConfig]:
    """(state dict, safetensors metadata, LoraConfig) of an adapter folder."""
    from safetensors import SafetensorError, safe_open

    root = Path(folder)
    weights, config_path = root / WEIGHTS_NAME, root / CONFIG_NAME
    if not weights.is_file() or not config_path.is_file():
        raise CheckpointError(f"{root}: not an adapter folder (needs {WEIGHTS_NAME} and {CONFIG_NAME})")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{weights}: unreadable adapter weights ({error})") from error
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
        fields = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
        lora_config = LoraConfig(**{k: v for k, v in raw.items() if k in fields})
    except (OSError, ValueError, TypeError) as error:
        raise CheckpointError(f"{config_path}: unreadable LoRA config ({error})") from error
    return state, metadata, lora_config


def _check_recorded_hash(adapter_dir: Path) -> None:
    """An adapter saved by the LoRA stage has its weights' sha256 in ``../adapter_meta.json``: check it."""
    meta_path = adapter_dir.parent / "adapter_meta.json"
    if not meta_path.is_file():
        return
    try:
        expected = json.loads(meta_path.read_text(encoding="utf-8")).get("adapter_sha256")
    except (OSError, ValueError, AttributeError) as error:
        raise CheckpointError(f"{meta_path}: unreadable adapter record ({error})") from None
    weights = adapter_dir / WEIGHTS_NAME
    if expected and weights.is_file() and sha256_file(weights) != expected:
        raise CheckpointError(f"{weights}: sha256 differs from the one recorded in {meta_path}; "
                              "the adapter was altered or replaced after training")


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike, base_sha256: str, adapter_name: str | None = None) -> str:
    """Add the adapter in ``adapter_dir`` to ``model`` and activate it; returns its name.

    Refuses (``CheckpointError``) an adapter trained on other base weights than ``base_sha256``.
    Several adapters can live on one base; switch between them with ``set_adapter``.
    """
    _check_recorded_hash(Path(adapter_dir))
    state, metadata, lora_config = read_adapter(adapter_dir)
    bound = metadata.get("config_sha256")  # adapters saved before it existed carry none
    config_path = Path(adapter_dir) / CONFIG_NAME
    if bound and sha256_file(config_path) != bound:
        raise CheckpointError(f"{config_path}: differs from the LoRA config saved with {WEIGHTS_NAME} (rank, alpha "
                              "and rsLoRA set what the weights mean); restore the adapter's own config")
    recorded = metadata.get("base_sha256")
    if not recorded:
        raise CheckpointError(f"{adapter_dir}: the adapter does not record the base model it was trained on")
    if recorded.lower() != str(base_sha256).lower():
        raise CheckpointError(
            f"{adapter_dir}: adapter was trained on base weights {recorded[:12]}..., "
            f"not on this model ({str(base_sha256)[:12]}...); load it onto its own base"
        )
    name = adapter_name or metadata.get("adapter_name") or Path(adapter_dir).name
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    add_adapter(model, lora_config, name)
    result = set_peft_model_state_dict(model, state, adapter_name=name)
    missing = [k for k in result.missing_keys if _is_adapter_param(k, name)]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{adapter_dir}: adapter weights do not fit this model (missing {missing[:5]}, "
            f"unexpected {list(result.unexpected_keys)[:5]})"
        )
    for param_name, param in model.named_parameters():
        param.requires_grad_(flags.get(param_name, False))  # loading is for inference; nothing new trains
    return name


@torch.no_grad()
def _fold_lora(layer: Any, base: nn.Module, adapter: str) -> None:
    """Add ``scaling * B @ A`` of one adapter to ``base.weight``.

    Written out here because peft's own merge mistakes a 1x1x1 Conv3d for a 1x1 Conv2d. LoRA's B is
    a 1x1(x1) convolution, so B after A is one convolution with A's kernel and B-mixed channels.
    """
    if adapter not in layer.lora_A:
        return
    if getattr(layer, "use_dora", {}).get(adapter, False):
        raise ModelError(f"adapter {adapter!r} uses DoRA, which merge_adapter does not fold")
    a = layer.lora_A[adapter].weight
    b = layer.lora_B[adapter].weight
    if isinstance(base, nn.Linear):
        delta = b @ a
    elif isinstance(base, nn.Conv3d) and base.groups == 1:
        delta = torch.einsum("or,r...->o...", b.flatten(1), a)
    else:
        raise ModelError(f"cannot fold LoRA into a {type(base).__name__}")
    base.weight += (delta * layer.scaling[adapter]).to(base.weight.dtype)


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold the active adapter into the base weights and drop every LoRA layer (in place).

    Returns the plain network (``merge_and_unload`` semantics), ready for ``save_model``.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            replacement = module.get_base_layer()
            for adapter in module.active_adapters:
                _fold_lora(module, replacement, adapter)
        elif isinstance(module, ModulesToSaveWrapper):
            active = module.active_adapters[0] if module.active_adapters else None
            replacement = module.modules_to_save[active] if active in module.modules_to_save else module.original_module
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, replacement)
    if hasattr(model, "peft_config"):
        del model.peft_config
    for param in model.parameters():
        param.requires_grad_(True)
    return model
