"""Sliding-window inference of a DuPLUS model on one preprocessed volume, all classes at once.

Each window runs the backbone once and the dynamic head once per prompt; windows are blended
(Gaussian) slab by slab (``duplus.inference.stitching``), so memory grows with the volume's
cross-section, not its depth.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from duplus.errors import ModelError
from duplus.inference.boundary import BoundaryCollector
from duplus.inference.packed import PackedMasks
from duplus.inference.stitching import FIXED, blend_slabs, count_windows
from duplus.progress import progress
from duplus.runtime import freed_memory_returned
from duplus.settings import Settings

log = logging.getLogger("duplus.inference")

# Blend on the GPU only while the [K, window depth, Y, X] slab buffer takes at most this share of the
# free GPU memory; beyond it the windows still run on the GPU but are blended in CPU memory.
GPU_STITCH_FRACTION = 0.5

# Windows per forward pass when inference.sw_batch_size is null: 2, except on a CPU for windows whose
# full-resolution layer exceeds ONEDNN_MIN_ELEMENTS. torch runs a 3-D convolution of batch 1 on oneDNN
# only when batch x channels x depth x height exceeds 20,480 (ConvParams::use_mkldnn, torch 2.13); below
# that it takes its im2col path (aten::slow_conv3d), 3-5x slower per window (tiny preset, 32^3 window:
# 0.65 s against 0.16 s per window in pairs). Above it, one window at a time is as fast (paper preset,
# 64^3: 6.11 s against 6.15 s per window, 2 cores) and holds half the network's activations, the
# largest part of the peak memory after the blending buffer (2.2 GB per 128^3 window at 32 prompts).
SW_BATCH_SIZE = 2
ONEDNN_MIN_ELEMENTS = 20480


def inference_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """Window, overlap, batch, blend mode and threshold from ``pretrain.patch_size`` and ``inference``."""
    settings = Settings.of(config)  # the schema bounds every value (ConfigError naming the key)
    inference = settings.inference
    return {
        "roi": tuple(int(p) for p in settings.pretrain.patch_size),
        "blend_buffer_mb": inference.blend_buffer_mb,
        "boundary_budget_mb": inference.boundary_budget_mb,
        "overlap": inference.overlap,
        # null: chosen per device and window by window_batch; without them, the GPU's 2.
        "sw_batch_size": int(inference.sw_batch_size or SW_BATCH_SIZE),
        "channels_last": inference.channels_last,
        "mode": inference.blend,
        "threshold": inference.threshold,
        # The precision the model trained in (pretrain.amp); autocast_for keeps CPU inference in fp32.
        "amp": settings.pretrain.amp,
    }


# `duplus segment --fast`: windows that overlap less, so fewer of them (2.6x fewer of 128^3 on a 300 x 512
# x 512 grid; Dice -0.0008 on the demo, bench/fast_settings.py; README "On a CPU"); the rest as configured.
FAST = {"overlap": 0.25}


def fast_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with the ``FAST`` inference settings (a copy)."""
    return {**config, "inference": {**(config.get("inference") or {}), **FAST}}


def window_batch(config: Mapping[str, Any], device: torch.device, width: int) -> int:
    """Windows per forward pass: ``inference.sw_batch_size``, or when it is null (the default) 2, and 1
    on a CPU when ``width`` (the network's full-resolution channels) x window depth x height exceeds
    ``ONEDNN_MIN_ELEMENTS`` (see there)."""
    configured = Settings.of(config).inference.sw_batch_size
    if configured is not None:
        return int(configured)
    roi = inference_settings(config)["roi"]
    if device.type == "cpu" and width * roi[0] * roi[1] > ONEDNN_MIN_ELEMENTS:
        return 1
    return SW_BATCH_SIZE


def first_width(model: torch.nn.Module) -> int:
    """Output channels of the network's first 3-D convolution: its full-resolution width."""
    return next((m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv3d)), 1)


def slab_axis(shape: Sequence[int], roi: Sequence[int]) -> int:
    """The axis (z = 0 or y = 1) slabs run along: the one whose window-deep ring of slabs, window x the
    other two sizes, is smaller (y for a CT of fewer than 512 slices of 512 x 512: 300 slices, 0.59x)."""
    z, y, x = (max(s, r) for s, r in zip(shape, roi))
    return 1 if roi[1] * z * x < roi[0] * y * x else 0


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def stitch_device_for(device: torch.device, buffer_elements: int) -> torch.device:
    """Where the slab buffer lives: the compute device unless a GPU lacks room for it."""
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    needed = 4 * buffer_elements * 2  # float32 buffer plus the finished slab divided out of it
    return device if needed <= GPU_STITCH_FRACTION * free else torch.device("cpu")


@contextlib.contextmanager
def inference_layout(model: torch.nn.Module, device: torch.device, channels_last: bool | None) -> Iterator[None]:
    """The network in NDHWC while inference runs, as ``inference.channels_last`` says (null: on a CPU),
    switched back afterwards; a network already NDHWC, or one without modality stems, is left as it is.

    On a CPU oneDNN's 3-D convolutions take NCDHW maps by reordering them into its blocked layout and
    back, a copy of each input and output: the paper network's 128^3 window at 32 prompts ran as fast in
    NDHWC (22.0 against 21.5 s) with its forward peaking at 1,087 MB against 1,685 MB (AMD EPYC, AVX2,
    2 quiet cores; bench/forward_cpu.py --layouts ncdhw ndhwc, forward_cpu-128-layouts-cpu2.json).
    """
    from duplus.model import is_channels_last, use_channels_last

    wanted = device.type == "cpu" if channels_last is None else channels_last
    if not wanted or is_channels_last(model) is not False:
        yield
        return
    use_channels_last(model)
    try:
        yield
    finally:
        use_channels_last(model, enabled=False)


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
    """``image`` as a float32 tensor, sharing its memory where it can: inference only reads the volume
    (windows are copied out of it), so a writable C-ordered float32 array (what preprocessing returns)
    needs no second copy beside the caller's (315 MB for a 300 x 512 x 512 CT). Anything else is copied:
    torch shares no read-only memory, and a memory-mapped file is read once rather than per window."""
    if isinstance(image, torch.Tensor):
        volume = image
    else:
        array = np.asarray(image)
        if (array.dtype != np.float32 or not array.flags.writeable or not array.flags.c_contiguous
                or isinstance(array, np.memmap)):
            array = np.array(array, dtype=np.float32)
        volume = torch.from_numpy(array)
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
    amp: str | None = None,
    show_progress: bool = True,
    desc: str = "windows",
) -> torch.Tensor:
    """Sigmoid probabilities [K, Z, Y, X] (float32, CPU) of one volume for K target prompts.

    Args:
        model: a DuPLUS network (a peft-wrapped one works too), already on its device.
        image: preprocessed volume [Z, Y, X]; smaller than the window is padded and cropped back.
        modality: index or name (``CT``/``MRI``/``PET``).
        context: T1 embedding [T]; targets: T2 embeddings [K, T].
        config: the run config (``pretrain.patch_size``, ``pretrain.amp`` and ``inference``).
        amp: ``auto|bf16|fp16|off`` on a GPU; None follows ``pretrain.amp``.

    ``predict_masks`` needs 4x less memory for the result; use it when only the masks matter.
    """
    volume = _as_volume(image)
    out = torch.empty((len(targets), *volume.shape), dtype=torch.float32)
    axis = slab_axis(volume.shape, inference_settings(config)["roi"])
    frame = out.transpose(1, 1 + axis)  # a view: slabs come along ``axis``
    with freed_memory_returned():
        for start, slab in _slabs(model, volume, modality, context, targets, config, amp, show_progress, desc, False,
                                  axis):
            frame[:, start : start + slab.shape[1]] = slab.clamp_(0.0, 1.0)
            del slab
    return out


def predict_masks(
    model: torch.nn.Module,
    image: np.ndarray | torch.Tensor,
    modality: int | str,
    context: torch.Tensor,
    targets: torch.Tensor,
    config: Mapping[str, Any],
    *,
    threshold: float | None = None,
    amp: str | None = None,
    show_progress: bool = True,
    desc: str = "windows",
) -> PackedMasks:
    """Masks [K, Z, Y, X] (bit-packed; ``masks[k]`` is class k as bool): probabilities above ``threshold``.

    Windows blend in 16-bit fixed point (``stitching.FIXED``: probabilities within 1.3e-4 of the float32
    blend at overlap 0.5, so only voxels that close to the threshold can change side), kept per class
    only where the class is present (``stitching.UnitBlocks``). Each finished slab is thresholded at
    once, so no [K, Z, Y, X] float array ever exists; the probabilities along each mask's boundary are
    kept too (``inference.boundary_budget_mb``), so ``masks.restored(k, meta)`` interpolates them onto
    the original grid. ``threshold`` defaults to ``inference.threshold``.
    """
    settings = inference_settings(config)
    cut = settings["threshold"] if threshold is None else float(threshold)
    volume = _as_volume(image)
    masks = PackedMasks(len(targets), tuple(volume.shape), cut=cut,
                        level_budget_bytes=int(settings["boundary_budget_mb"] * 2**20))
    axis = slab_axis(volume.shape, settings["roi"])
    collector = BoundaryCollector(masks, axis) if masks.level_budget_bytes else None
    # Else the blending's freed buffers stay resident between its class blocks (1.2 GB at 32 prompts).
    with freed_memory_returned():
        for start, slab in _slabs(model, volume, modality, context, targets, config, amp, show_progress, desc, True,
                                  axis):
            inside = slab > cut
            masks.write(start, inside.cpu().numpy(), axis)
            if collector is not None:
                collector.add(start, slab, inside)
            del slab, inside  # not kept while the next windows run
    if masks.mask_only and collector is not None:
        log.warning("%d of %d classes outgrew inference.boundary_budget_mb (%g MB) of boundary probabilities: "
                    "they are copied to the original grid voxel by voxel, not interpolated",
                    len(masks.mask_only), len(masks), settings["boundary_budget_mb"])
    return masks


def _slabs(
    model: torch.nn.Module,
    volume: torch.Tensor,
    modality: int | str,
    context: torch.Tensor,
    targets: torch.Tensor,
    config: Mapping[str, Any],
    amp: str | None,
    show_progress: bool,
    desc: str,
    masks_only: bool,
    axis: int = 0,
) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, probabilities [K, d, ...]) of consecutive slabs along ``axis``, the other two axes in order."""
    from duplus.model import modalities_of, modality_index

    settings = inference_settings(config)
    amp = settings["amp"] if amp is None else amp
    device = model_device(model)
    index = modality if isinstance(modality, int) else modality_index(modality, modalities_of(model))
    context = torch.as_tensor(context, dtype=torch.float32, device=device).reshape(1, -1)
    targets = torch.as_tensor(targets, dtype=torch.float32, device=device)
    if targets.dim() != 2 or targets.shape[0] == 0:
        raise ModelError(f"targets must be [K, T] with K >= 1, got {tuple(targets.shape)}")
    k = targets.shape[0]
    # Blended in a frame whose first axis is ``axis``: windows go back to the volume's orientation for
    # the network, and its outputs come into the frame as views (no copies).
    volume = volume.transpose(0, axis)
    roi = list(settings["roi"])
    roi[0], roi[axis] = roi[axis], roi[0]
    slab_elements = k * roi[0] * max(volume.shape[1], roi[1]) * max(volume.shape[2], roi[2])
    stitch_device = stitch_device_for(device, slab_elements)
    # Masks need the 16-bit buffer only; probabilities are float32 unless that outgrows blend_buffer_mb.
    small = 4 * slab_elements <= settings["blend_buffer_mb"] * 2**20
    buffer_dtype = torch.float32 if small and not masks_only else FIXED

    total = count_windows(volume.shape, roi, settings["overlap"])
    bar = progress(total=total, desc=desc, unit="win") if show_progress else _NoBar()
    batch = window_batch(config, device, first_width(model))
    modality_ids = torch.full((batch,), index, dtype=torch.long)  # host-side routing index

    def predictor(windows: torch.Tensor) -> torch.Tensor:
        n = windows.shape[0]
        with torch.no_grad(), autocast_for(device, amp):
            logits = model(windows, modality_ids[:n], context.expand(n, -1), targets)
        bar.update(n)
        # Blend probabilities in fp32: bf16 loses the small weights at window borders. In place: the
        # logits are this call's own, and a second K x window copy would add to the peak.
        return logits.float().sigmoid_()

    def framed(windows: torch.Tensor) -> torch.Tensor:
        return predictor(windows.transpose(2, 2 + axis).contiguous()).transpose(2, 2 + axis)

    was_training = model.training
    model.eval()
    try:
        with inference_layout(model, device, settings["channels_last"]):
            yield from blend_slabs(volume, framed if axis else predictor, k, roi=roi, overlap=settings["overlap"],
                                   sw_batch_size=batch, mode=settings["mode"],
                                   device=device, stitch_device=stitch_device, buffer_dtype=buffer_dtype)
    finally:
        bar.close()
        model.train(was_training)
