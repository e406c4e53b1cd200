"""Sliding-window inference of a DuPLUS model on one preprocessed volume, all classes at once.

Each window runs the backbone once and the dynamic head once per prompt; windows are blended (Gaussian).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from duplus.errors import ConfigError, ModelError
from duplus.progress import progress

# Stitch on the GPU only while the [K, Z, Y, X] output and its weight map take at most this share
# of the free GPU memory; beyond it the windows still run on the GPU but are blended in CPU memory.
GPU_STITCH_FRACTION = 0.5


def inference_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """Window, overlap, batch, blend mode and threshold from ``pretrain.patch_size`` and ``inference``."""
    section = dict(config.get("inference") or {})
    patch = (config.get("pretrain") or {}).get("patch_size", [128, 128, 128])
    if len(patch) != 3 or any(int(p) < 1 for p in patch):
        raise ConfigError(f"pretrain.patch_size must be three positive integers, got {patch!r}")
    blend = section.get("blend", "gaussian")
    if blend not in ("gaussian", "constant"):
        raise ConfigError(f"inference.blend must be 'gaussian' or 'constant', got {blend!r}")
    overlap = float(section.get("overlap", 0.5))
    if not 0.0 <= overlap < 1.0:
        raise ConfigError(f"inference.overlap must be in [0, 1), got {overlap!r}")
    return {
        "roi": tuple(int(p) for p in patch),
        "overlap": overlap,
        "sw_batch_size": int(section.get("sw_batch_size", 2)),
        "mode": blend,
        "threshold": float(section.get("threshold", 0.5)),
    }


def count_windows(shape: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    """Number of windows sliding_window_inference visits (after padding up to the window)."""
    total = 1
    for size, window in zip(shape, roi):
        size = max(size, window)
        step = max(int(window * (1 - overlap)), 1)
        starts = {min(i * step, size - window) for i in range(math.ceil(size / step))}
        total *= len(starts)
    return total


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def stitch_device_for(device: torch.device, output_elements: int) -> torch.device:
    """Where the blended output lives: the compute device unless a GPU lacks room for it."""
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    needed = 4 * output_elements * 2  # float32 output plus its share of the weight map and the final copy
    return device if needed <= GPU_STITCH_FRACTION * free else torch.device("cpu")


@contextlib.contextmanager
def autocast_for(device: torch.device, amp: str = "auto") -> Iterator[None]:
    """bf16 (or fp16 where bf16 is unsupported) autocast on CUDA; full precision on CPU."""
    if device.type != "cuda" or amp == "off":
        yield
        return
    if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()):
        dtype = torch.float16
    else:
        dtype = torch.bfloat16
    with torch.autocast("cuda", dtype=dtype):
        yield


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _as_volume(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    # np.array copies: memory-mapped or read-only arrays must not be shared with torch.
    volume = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.array(image, dtype=np.float32))
    if volume.dim() != 3:
        raise ModelError(f"expected one preprocessed volume [Z, Y, X], got shape {tuple(volume.shape)}")
    return volume.float()


def predict_probabilities(
    model: torch.nn.Module,
    image: np.ndarray | torch.Tensor,
    modality: int | str,
    context: torch.Tensor,
    targets: torch.Tensor,
    config: Mapping[str, Any],
    *,
    amp: str = "auto",
    show_progress: bool = True,
    desc: str = "windows",
) -> torch.Tensor:
    """Sigmoid probabilities [K, Z, Y, X] (float32, CPU) of one volume for K target prompts.

    Args:
        model: a DuPLUS network (a peft-wrapped one works too), already on its device.
        image: preprocessed volume [Z, Y, X]; smaller than the window is padded and cropped back.
        modality: index or name (``CT``/``MRI``/``PET``).
        context: T1 embedding [T]; targets: T2 embeddings [K, T].
        config: the run config (``pretrain.patch_size`` and ``inference``).
    """
    from duplus.model import modality_index

    settings = inference_settings(config)
    device = model_device(model)
    volume = _as_volume(image)
    index = modality if isinstance(modality, int) else modality_index(modality)
    context = torch.as_tensor(context, dtype=torch.float32, device=device).reshape(1, -1)
    targets = torch.as_tensor(targets, dtype=torch.float32, device=device)
    if targets.dim() != 2 or targets.shape[0] == 0:
        raise ModelError(f"targets must be [K, T] with K >= 1, got {tuple(targets.shape)}")
    k = targets.shape[0]
    stitch_device = stitch_device_for(device, k * volume.numel())

    total = count_windows(volume.shape, settings["roi"], settings["overlap"])
    bar = progress(total=total, desc=desc, unit="win") if show_progress else _NoBar()
    modality_ids = torch.full((settings["sw_batch_size"],), index, dtype=torch.long, device=device)

    def predictor(windows: torch.Tensor) -> torch.Tensor:
        n = windows.shape[0]
        with autocast_for(device, amp):
            logits = model(windows, modality_ids[:n], context.expand(n, -1), targets)
        bar.update(n)
        # Blend probabilities in fp32: bf16 loses the small weights at window borders.
        return torch.sigmoid(logits.float())

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            probs = sliding_window_inference(
                volume[None, None].to(device),
                roi_size=settings["roi"],
                sw_batch_size=settings["sw_batch_size"],
                predictor=predictor,
                overlap=settings["overlap"],
                mode=settings["mode"],
                sw_device=device,
                device=stitch_device,
            )
    finally:
        bar.close()
        model.train(was_training)
    return probs[0].float().cpu().clamp_(0.0, 1.0)
