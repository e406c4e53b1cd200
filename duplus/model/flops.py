"""Cost of one inference window: multiply-adds counted by forward hooks, and parameter counts.

The count runs on torch's ``meta`` device, so even the paper model at 128^3 costs no real compute.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from duplus.errors import ModelError
from duplus.model.config import ModelConfig
from duplus.model.duplus import DuPLUS, count_parameters


def _dynamic_head_macs(cfg: ModelConfig, voxels: int, n_classes: int) -> int:
    c = cfg.head_channels
    return n_classes * voxels * (c * c + c * c + c)


def count_macs(model_or_cfg: nn.Module | ModelConfig, window: Sequence[int], n_classes: int = 1) -> int:
    """Multiply-adds of one forward pass on a [1, 1, *window] input with ``n_classes`` prompts.

    Counts every Conv3d and Linear (hooks) plus the dynamic head's batched matmuls (analytic).
    """
    cfg = model_or_cfg if isinstance(model_or_cfg, ModelConfig) else _config_of(model_or_cfg)
    total = 0

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv3d):
            per_output = (module.in_channels // module.groups) * math.prod(module.kernel_size)
            total += output.numel() * per_output
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features

    with torch.device("meta"):
        net = DuPLUS(cfg)
    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (nn.Conv3d, nn.Linear))]
    try:
        with torch.no_grad():
            image = torch.zeros((1, 1, *window), device="meta")
            context = torch.zeros((1, cfg.text_dim), device="meta")
            targets = torch.zeros((n_classes, cfg.text_dim), device="meta")
            _, bottleneck = _features_meta(net, image, context)
            net.controller(bottleneck, net.project_targets(targets.unsqueeze(0)))
    finally:
        for handle in handles:
            handle.remove()
    return int(total) + _dynamic_head_macs(cfg, math.prod(window), n_classes)


def _features_meta(net: DuPLUS, image: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # The stems split a batch by modality with torch.unique, which meta tensors cannot answer;
    # a single-sample window always uses one stem, so call it directly.
    films = net.film_params(context)
    stem = next(iter(net.stems.values()))
    skips = net.encoder(stem(image), films)
    bottleneck = skips[-1]  # before the decoder, which may empty the list (Decoder.forward)
    return net.decoder(skips, films), bottleneck


def _config_of(model: nn.Module) -> ModelConfig:
    for module in model.modules():
        if isinstance(module, DuPLUS):
            return module.cfg
    raise ModelError(f"{type(model).__name__} contains no DuPLUS network")


def efficiency(model: nn.Module, window: Sequence[int], n_classes: int = 1) -> dict[str, object]:
    """``params``, ``macs_per_window`` and ``window`` as reported in efficiency.json."""
    return {
        "params": count_parameters(model),
        "macs_per_window": count_macs(model, window, n_classes),
        "window": [int(w) for w in window],
    }
