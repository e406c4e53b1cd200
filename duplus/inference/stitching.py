"""Sliding-window blending that streams: finished slabs leave memory as soon as no window can touch them.

MONAI's ``sliding_window_inference`` keeps a float32 [K, Z, Y, X] output plus a weight map for the
whole volume: 20 GB for 32 prompts on a 300 x 512 x 512 CT. Here windows run one z-row at a time
(every y, x start of one z start); when the next z-row begins, the slices before it are final, are
handed to the caller and their memory is freed. Float buffers are a ring one window deep (K x window
depth x Y x X values). The 16-bit fixed-point sums (``FIXED``, what masks use) are kept per class in
blocks of ``BLOCK`` voxels, only where a class's window shares round to at least one unit, and in 8 bits
while a block's sums stay below 256 units: a class absent from a region (most of 32 prompts almost
everywhere) holds no memory there, and the sums are the same as a dense buffer's, bit for bit; a dense
int16 ring small enough (``DENSE_FIXED_BYTES``: one or two prompts) is kept as it is. "z" is
the first axis of the volume handed in (the caller may transpose it). Window positions and the Gaussian
weights are MONAI's (``compute_importance_map``).
"""

from __future__ import annotations

import itertools
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


# Blocks of the fixed-point sums (z, y, x): small enough that an organ's blocks are mostly its own (the
# stand-in of bench/blend_memory.py: 43 % of class blocks hold units at this size, 83 % at 32 x 64 x 64),
# large enough that a 128^3 window meets 128-225 of them (one Python step each, vectorised over classes).
BLOCK = (16, 32, 32)
# The fixed-point sums stay one dense int16 ring (K x window depth x Y x X, as for float buffers) while it
# takes at most this many bytes: one or two prompts on a 300 x 512 x 512 CT (39 MB per prompt for 128^3
# windows along y), where blocks would save a few MB and cost their bookkeeping on every window (at 1
# prompt blending took 2.8x as long per window, bench/blend_time.py). Blocks from 8 prompts up (315 MB dense).
DENSE_FIXED_BYTES = 128 * 2**20
# A block's sums stay 8-bit while below this many units (probabilities below 0.0078: an absent class's
# background), 16-bit once any exceeds it.
SMALL_UNITS = 256


class UnitBlocks:
    """Fixed-point sums [K, Z, Y, X] kept per class in blocks, only where a class has any units.

    Written by hand: no library keeps a block-sparse integer array that grows by in-place adds (torch's
    sparse tensors coalesce whole index lists; scipy's are 2-D). Blocks are dropped once their slices
    are taken, so memory follows the slices still open and where each class is present there.
    """

    def __init__(self, classes: int, device: torch.device, block: Sequence[int] = BLOCK) -> None:
        self.classes = classes
        self.device = device
        self.block = tuple(int(b) for b in block)
        # z-block -> (y-block, x-block) -> class -> uint8 or int16 tile of ``block`` voxels
        self._rows: dict[int, dict[tuple[int, int], dict[int, torch.Tensor]]] = {}

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for row in self._rows.values() for tiles in row.values() for t in tiles.values())

    def _spans(self, axis: int, start: int, length: int) -> Iterator[tuple[int, int, int]]:
        """(block index, first, end) of the blocks along ``axis`` that [start, start + length) meets."""
        size = self.block[axis]
        for index in range(start // size, (start + length - 1) // size + 1):
            yield index, max(start, index * size), min(start + length, (index + 1) * size)

    def add(self, units: torch.Tensor, corner: Sequence[int]) -> None:
        """Add ``units`` [K, dz, dy, dx] (float, whole numbers >= 0, each sum below int16's limit) at ``corner``."""
        z, y, x = corner
        bz, by, bx = self.block
        # On a CPU the per-block tests run in numpy: small single-threaded reductions, where torch's
        # multi-threaded ones wait longer for their threads than they compute on cores other jobs share.
        host = units.numpy() if units.device.type == "cpu" else None
        for zb, z0, z1 in self._spans(0, z, units.shape[1]):
            row = self._rows.setdefault(zb, {})
            for yb, y0, y1 in self._spans(1, y, units.shape[2]):
                for xb, x0, x1 in self._spans(2, x, units.shape[3]):
                    box = (slice(None), slice(z0 - z, z1 - z), slice(y0 - y, y1 - y), slice(x0 - x, x1 - x))
                    part = units[box]
                    most = part.amax(dim=(1, 2, 3)).cpu().numpy() if host is None else host[box].max(axis=(1, 2, 3))
                    present = np.flatnonzero(most > 0).tolist()
                    if not present:
                        continue
                    tiles = row.setdefault((yb, xb), {})
                    inner = (slice(z0 - zb * bz, z1 - zb * bz), slice(y0 - yb * by, y1 - yb * by),
                             slice(x0 - xb * bx, x1 - xb * bx))
                    for k, add in zip(present, part[present].to(FIXED)):
                        tile = tiles.get(k)
                        if tile is None:
                            tile = tiles[k] = torch.zeros(self.block, dtype=torch.uint8, device=self.device)
                        if tile.dtype == torch.uint8:
                            total = tile[inner].to(FIXED).add_(add)
                            if (total.max() if host is None else total.numpy().max()) < SMALL_UNITS:
                                tile[inner] = total.to(torch.uint8)
                                continue
                            tile = tiles[k] = tile.to(FIXED)
                        tile[inner] += add

    def take(self, lo: int, hi: int, ny: int, nx: int) -> torch.Tensor:
        """The sums of slices [lo, hi), cropped to ``ny`` x ``nx``, as float32 [K, hi - lo, ny, nx]."""
        bz, by, bx = self.block
        out = torch.zeros((self.classes, hi - lo, ny, nx), dtype=torch.float32, device=self.device)
        for zb, z0, z1 in self._spans(0, lo, hi - lo):
            for (yb, xb), tiles in self._rows.get(zb, {}).items():
                y0, x0 = yb * by, xb * bx
                if y0 >= ny or x0 >= nx:  # padding beyond the volume
                    continue
                y1, x1 = min(y0 + by, ny), min(x0 + bx, nx)
                for k, tile in tiles.items():
                    out[k, z0 - lo : z1 - lo, y0:y1, x0:x1] = tile[z0 - zb * bz : z1 - zb * bz, : y1 - y0, : x1 - x0]
        return out

    def drop(self, upto: int) -> None:
        """Free the blocks that lie wholly below slice ``upto``."""
        for zb in [zb for zb in self._rows if (zb + 1) * self.block[0] <= upto]:
            del self._rows[zb]


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
    dense_fixed_bytes: int = DENSE_FIXED_BYTES,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(z0, probs)``: blended predictions [K, dz, Y, X] (float32, on ``stitch_device``) of
    consecutive z-ranges of ``volume`` [Z, Y, X], in order, covering it exactly once.

    ``predictor`` maps windows [n, 1, *roi] on ``device`` to [n, K, *roi] values to blend (a fresh
    tensor: it is weighted in place). Volumes smaller than the window are padded at the far end with
    their minimum and cropped back. ``buffer_dtype``: float32 gives MONAI's numbers; float16 halves the
    buffer and errs by up to ~2e-3 (weights stay float32); ``FIXED`` keeps integer sums in
    ``UnitBlocks`` (memory only where a class has units) or, while a dense int16 ring takes at most
    ``dense_fixed_bytes``, in that ring (the same sums, bit for bit), for values in [0, 1] only
    (probabilities: beyond 1 the sum may overflow), and errs by at most ``max_cover / 2`` units of
    ``1 / fixed_scale``.
    The first axis is the slab axis: ``duplus.inference.predict`` hands in a transposed volume (and a
    predictor that turns windows back) where slabs along y are smaller.
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
    ring_shape = (classes, rz, padded[1], padded[2])
    dense = not fixed or math.prod(ring_shape) * FIXED.itemsize <= dense_fixed_bytes
    acc = torch.zeros(ring_shape, dtype=buffer_dtype, device=stitch_device) if dense else None
    blocks = None if dense else UnitBlocks(classes, stitch_device)
    # Float buffers: the weights added so far, divided out as slices leave.
    weight_sum = None if fixed else torch.zeros((rz, padded[1], padded[2]), device=stitch_device)
    plane = [(y, x) for y in y_starts for x in x_starts]
    done = 0  # slices below this are emitted
    near = [{s: [t for t in starts if abs(t - s) < r] for s in starts} for starts, r in zip((z_starts, y_starts, x_starts), roi)]
    # Dense ring: the last window's factor and the other windows' offsets it came from. The same offsets
    # give the same total weight, bit for bit, and consecutive windows of a row mostly share them (all but
    # the first and last two of a row), so most windows skip the window-sized additions of their
    # neighbours' weights. Blocks keep none: one more window-sized float32 array (8 MB at 128^3) held
    # through the network's forward would add to the peak where memory is what blocks are for.
    last_factor: list = [None, None]

    def factor_at(corner: tuple[int, int, int]) -> torch.Tensor:
        """FIXED: weight x scale / total weight of the window at ``corner``."""
        key = tuple(tuple(t - corner[axis] for t in near[axis][corner[axis]]) for axis in range(3))
        if last_factor[0] == key:
            return last_factor[1]
        last_factor[:] = [None, None]  # the old one goes before the new one is made
        factor = stitch_weight.mul(scale).div_(total_weight(corner))
        if blocks is None:
            last_factor[:] = [key, factor]
        return factor

    # Windows are gathered in the memory order of ``volume`` (which may be a transposed view): a caller that
    # turns them back for its network (duplus.inference.predict, slabs along y) then gets them contiguous.
    order = sorted(range(3), key=lambda d: -volume.stride(d))
    back = [2 + order.index(d) for d in range(3)]

    def gather(z: int, corners: list[tuple[int, int]]) -> torch.Tensor:
        out = torch.empty((len(corners), 1, *(roi[d] for d in order)), dtype=volume.dtype, device=volume.device)
        out = out.permute(0, 1, *back)
        for i, (y, x) in enumerate(corners):
            out[i, 0] = volume[z : z + rz, y : y + ry, x : x + rx]
        return out

    def total_weight(corner: tuple[int, int, int]) -> torch.Tensor:
        """FIXED: the weight all windows put on the window at ``corner`` [rz, ry, rx], known before they run.
        Added window by window in z-row, y, x order: each voxel's float sum is the same, bit for bit, as
        a whole buffer of every window's weight would hold, for the window-sized memory."""
        total = torch.zeros(tuple(roi), device=stitch_device)
        for other in itertools.product(*(near[axis][corner[axis]] for axis in range(3))):
            box = tuple(slice(max(o, c) - c, min(o, c) + r - c) for o, c, r in zip(other, corner, roi))
            part = tuple(slice(max(o, c) - o, min(o, c) + r - o) for o, c, r in zip(other, corner, roi))
            total[box] += stitch_weight[part]
        return total

    def finish(upto: int) -> Iterator[tuple[int, torch.Tensor]]:
        nonlocal done
        if upto == done:
            return
        for ring, offset in _ring(done, upto - done, rz):
            z0 = done + offset.start
            dz = min(offset.stop, shape[0] - done) - offset.start
            for first in range(0, max(dz, 0), EMIT_SLICES):
                rows = slice(ring.start + first, ring.start + min(dz, first + EMIT_SLICES))
                if blocks is not None:
                    part = blocks.take(z0 + first, z0 + first + rows.stop - rows.start, shape[1], shape[2])
                    yield z0 + first, part.div_(scale)
                else:
                    part = acc[:, rows, : shape[1], : shape[2]].to(torch.float32, copy=True)
                    yield z0 + first, part.div_(scale if fixed else weight_sum[rows, : shape[1], : shape[2]])
                del part
            if acc is not None:
                acc[:, ring].zero_()
            if weight_sum is not None:
                weight_sum[ring].zero_()
        done = upto
        if blocks is not None:
            blocks.drop(upto)

    for z in z_starts:
        yield from finish(z)
        for first in range(0, len(plane), sw_batch_size):
            corners = plane[first : first + sw_batch_size]
            windows = gather(z, corners)
            out = predictor(windows.to(device, non_blocking=True))
            del windows
            if not fixed:
                out.mul_(weight)
            out = out.to(stitch_device)  # blocking: a non-blocking copy to host memory may be read too early
            for (y, x), values in zip(corners, out):
                if fixed:
                    # The window's share of each voxel in units: one multiplication of the K values by a
                    # window-sized factor (weight x scale / total weight), rounded; blocks add it where not zero.
                    units = values.mul_(factor_at((z, y, x))).round_()
                    if blocks is not None:
                        blocks.add(units, (z, y, x))
                        continue
                    for ring, offset in _ring(z, rz, rz):
                        acc[:, ring, y : y + ry, x : x + rx] += units[:, offset].to(FIXED)
                    continue
                for ring, offset in _ring(z, rz, rz):
                    box = (ring, slice(y, y + ry), slice(x, x + rx))
                    acc[(slice(None), *box)] += values[:, offset]
                    weight_sum[box] += stitch_weight[offset]
            # Dropped before the next window batch runs: K x window values the network's peak need not meet.
            del out, values
    yield from finish(padded[0])
