"""Sliding-window blending that streams: finished slabs leave memory as soon as no window can touch them.

MONAI's ``sliding_window_inference`` keeps a float32 [K, Z, Y, X] output plus a weight map for the
whole volume: 20 GB for 32 prompts on a 300 x 512 x 512 CT. Here windows run one z-row at a time
(every y, x start of one z start) and blend into a ring buffer one window deep; when the next z-row
begins, the slices before it are final, are handed to the caller and the buffer slots are reused.
Peak memory: K x window-depth x Y x X values (float32, or 16-bit fixed point, ``FIXED``), whatever
the volume's depth. Window positions and the Gaussian weights are MONAI's (``compute_importance_map``).
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map

Predictor = Callable[[torch.Tensor], torch.Tensor]

# Finished slices leave in pieces of at most this many, so the divided-out copy stays small.
EMIT_SLICES = 4

# The 16-bit buffer: int16 holding each window's share of the final probability (its weight over the
# total weight every window puts on the voxel, known before any window runs) in units of 1 / scale.
# Integer sums are exact and independent of the order windows arrive in; float16 sums of weighted
# probabilities lose up to ~2e-3 (11-bit mantissa), these at most half a unit per covering window.
FIXED = torch.int16


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Start offsets of the windows along one axis (after padding ``size`` up to ``window``)."""
    size = max(size, window)
    step = max(int(window * (1 - overlap)), 1)
    return sorted({min(i * step, size - window) for i in range(math.ceil(size / step))})


def count_windows(shape: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    """Number of windows one volume needs."""
    return math.prod(len(window_starts(s, r, overlap)) for s, r in zip(shape, roi))


def max_cover(shape: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    """The most windows any voxel lies in (after padding ``shape`` up to ``roi``)."""
    most = 1
    for size, window in zip(shape, roi):
        size = max(size, window)
        cover = np.zeros(size, dtype=np.int64)
        for start in window_starts(size, window, overlap):
            cover[start : start + window] += 1
        most *= int(cover.max())
    return most


def fixed_scale(cover: int) -> int:
    """Units per probability 1 in the ``FIXED`` buffer: each of ``cover`` windows rounds by at most half
    a unit, so the sum stays below int16's limit (max error: ``cover / 2`` units, 1.3e-4 at overlap 0.5)."""
    return torch.iinfo(FIXED).max - (cover + 1) // 2 - 1


def _ring(start: int, length: int, depth: int) -> list[tuple[slice, slice]]:
    """(ring-buffer slice, offset slice into a block of ``length``) pairs covering z in [start, start+length)."""
    first = start % depth
    head = min(length, depth - first)
    pieces = [(slice(first, first + head), slice(0, head))]
    if head < length:
        pieces.append((slice(0, length - head), slice(head, length)))
    return pieces


def blend_slabs(
    volume: torch.Tensor,
    predictor: Predictor,
    classes: int,
    *,
    roi: Sequence[int],
    overlap: float,
    sw_batch_size: int,
    mode: str,
    device: torch.device,
    stitch_device: torch.device,
    buffer_dtype: torch.dtype = torch.float32,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(z0, probs)``: blended predictions [K, dz, Y, X] (float32, on ``stitch_device``) of
    consecutive z-ranges of ``volume`` [Z, Y, X], in order, covering it exactly once.

    ``predictor`` maps windows [n, 1, *roi] on ``device`` to [n, K, *roi] values to blend (a fresh
    tensor: it is weighted in place). Volumes smaller than the window are padded at the far end with
    their minimum and cropped back. ``buffer_dtype``: float32 gives MONAI's numbers; float16 halves the
    buffer and errs by up to ~2e-3 (weights stay float32); ``FIXED`` halves it too, for values in
    [0, 1] only (probabilities: beyond 1 the sum may overflow), and errs by at most ``max_cover / 2``
    units of ``1 / fixed_scale``.
    """
    shape = tuple(volume.shape)
    padded = [max(s, r) for s, r in zip(shape, roi)]
    if padded != list(shape):
        # Filled with the volume's minimum, as training pads its patches (duplus.train.sampling.extract):
        # zero is the mean intensity inside the body after normalisation, not background.
        volume = F.pad(volume, (0, padded[2] - shape[2], 0, padded[1] - shape[1], 0, padded[0] - shape[0]),
                       value=float(volume.min()))
    z_starts, y_starts, x_starts = (window_starts(p, r, overlap) for p, r in zip(padded, roi))
    rz, ry, rx = roi
    weight = compute_importance_map(tuple(roi), mode=mode, device=device)
    stitch_weight = weight.to(stitch_device)
    fixed = buffer_dtype == FIXED
    scale = fixed_scale(max_cover(padded, roi, overlap)) if fixed else 1
    acc = torch.zeros((classes, rz, padded[1], padded[2]), dtype=buffer_dtype, device=stitch_device)
    # Float buffers: the weights added so far, divided out as slices leave. FIXED: every window's
    # weight on the ring's slices, added before those windows run, so each share is final when added.
    weight_sum = torch.zeros((rz, padded[1], padded[2]), device=stitch_device)
    plane = [(y, x) for y in y_starts for x in x_starts]
    done = 0  # slices below this are emitted
    totalled = 0  # FIXED: slices below this hold their total weight in weight_sum

    def add_weights(z: int, lo: int, hi: int) -> None:
        """Add the weights of z-row ``z``'s windows that fall on slices [lo, hi)."""
        first, last = max(lo, z), min(hi, z + rz)
        for ring, offset in _ring(first, last - first, rz) if first < last else ():
            part = stitch_weight[first - z + offset.start : first - z + offset.stop]
            for y, x in plane:
                weight_sum[ring, y : y + ry, x : x + rx] += part

    def finish(upto: int) -> Iterator[tuple[int, torch.Tensor]]:
        nonlocal done
        if upto == done:
            return
        for ring, offset in _ring(done, upto - done, rz):
            z0 = done + offset.start
            dz = min(offset.stop, shape[0] - done) - offset.start
            for first in range(0, max(dz, 0), EMIT_SLICES):
                rows = slice(ring.start + first, ring.start + min(dz, first + EMIT_SLICES))
                part = acc[:, rows, : shape[1], : shape[2]].to(torch.float32, copy=True)
                yield z0 + first, part.div_(scale if fixed else weight_sum[rows, : shape[1], : shape[2]])
            acc[:, ring].zero_()
            weight_sum[ring].zero_()
        done = upto

    for z in z_starts:
        yield from finish(z)
        if fixed and totalled < z + rz:
            for row in z_starts:
                add_weights(row, max(totalled, z), z + rz)
            totalled = z + rz
        for first in range(0, len(plane), sw_batch_size):
            corners = plane[first : first + sw_batch_size]
            windows = torch.stack([volume[z : z + rz, y : y + ry, x : x + rx] for y, x in corners])
            out = predictor(windows[:, None].to(device, non_blocking=True))
            del windows
            if not fixed:
                out.mul_(weight)
            out = out.to(stitch_device)  # blocking: a non-blocking copy to host memory may be read too early
            for (y, x), values in zip(corners, out):
                for ring, offset in _ring(z, rz, rz):
                    box = (ring, slice(y, y + ry), slice(x, x + rx))
                    if fixed:
                        # The window's share of each voxel in units: one multiplication of the K values by a
                        # window-sized factor (weight x scale / total weight), then rounded.
                        factor = stitch_weight[offset].mul(scale).div_(weight_sum[box])
                        acc[(slice(None), *box)] += values[:, offset].mul_(factor).round_().to(FIXED)
                    else:
                        acc[(slice(None), *box)] += values[:, offset]
                        weight_sum[box] += stitch_weight[offset]
            # Dropped before the next window batch runs: K x window values the network's peak need not meet.
            del out, values
    yield from finish(padded[0])
