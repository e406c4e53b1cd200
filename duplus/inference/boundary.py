"""Keeps the probabilities of the voxels along each predicted mask's boundary, slab by slab.

A mask predicted on the 1.5 mm grid and copied to a finer original grid by nearest neighbour has
staircase edges (a small organ loses 5-10 Dice points). Interpolating the probabilities linearly and
thresholding on the original grid, as nnU-Net does, needs the probability of a voxel only where its
3x3x3 neighbourhood holds both sides of the threshold: every other interpolation cell lies wholly on
one side, whatever the exact values. Those voxels form a thin shell, so they are kept sparsely
(uint8 levels) beside the bit-packed masks instead of a [K, Z, Y, X] float array.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from duplus.inference.packed import LEVELS, PackedMasks


def dilate(mask: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """3x3x3 binary dilation of a bool [Z, Y, X] tensor or array (a box is separable: one pass per axis)."""
    out = mask.copy() if isinstance(mask, np.ndarray) else mask.clone()
    for axis in range(3):
        n = out.shape[axis]
        if n < 2:
            continue
        source = out.copy() if isinstance(out, np.ndarray) else out.clone()
        head, tail = [slice(None)] * 3, [slice(None)] * 3
        head[axis], tail[axis] = slice(1, n), slice(0, n - 1)
        out[tuple(head)] |= source[tuple(tail)]
        out[tuple(tail)] |= source[tuple(head)]
    return out


def boundary(mask: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Voxels whose 3x3x3 neighbourhood (themselves included) holds both inside and outside voxels."""
    return dilate(mask) & dilate(~mask)


def boundary_index(inside: np.ndarray) -> np.ndarray:
    """Flat indices (into ``inside`` [Z, Y, X], bool) of its boundary voxels, looked for only in the box
    of the inside voxels one voxel wider: no voxel beyond it has an inside neighbour. In numpy: these
    are small reductions, single-threaded there, while torch's multi-threaded ones wait far longer for
    their threads than they compute on cores other jobs share (a bool ``any`` of 0.8 M voxels: 24 ms
    against numpy's microseconds on 2 loaded cores)."""
    if not inside.any():
        return np.empty(0, dtype=np.int64)
    box = []
    for axis in range(3):
        hits = np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append((max(int(hits[0]) - 1, 0), min(int(hits[-1]) + 2, inside.shape[axis])))
    (z0, z1), (y0, y1), (x0, x1) = box
    local = np.nonzero(boundary(inside[z0:z1, y0:y1, x0:x1]))
    return np.ravel_multi_index((local[0] + z0, local[1] + y0, local[2] + x0), inside.shape)


def to_levels(probabilities: torch.Tensor, cut: float) -> torch.Tensor:
    """uint8 levels (p x 255) that keep each voxel on its side of ``cut`` (see ``PackedMasks.level_cut``)."""
    floor = math.floor(cut * LEVELS)
    levels = (probabilities.float() * LEVELS).round_().clamp_(0, LEVELS)
    inside = probabilities > cut
    levels = torch.where(inside, levels.clamp(min=min(floor + 1, LEVELS)), levels.clamp(max=floor))
    return levels.to(torch.uint8)


class BoundaryCollector:
    """Feeds ``masks`` the boundary levels of consecutive slabs [K, dz, Y, X] (as ``_slabs`` yields them;
    ``axis`` 1: slabs [K, dy, Z, X] along y).

    The last plane of each slab is kept until the next slab arrives, since its neighbourhood reaches
    into it; a voxel already kept is not kept twice.
    """

    def __init__(self, masks: PackedMasks, axis: int = 0) -> None:
        self.masks = masks
        self.cut = masks.cut
        self.axis = axis
        grid = list(masks.shape[1:])
        grid[0], grid[axis] = grid[axis], grid[0]
        self._frame = tuple(grid)  # the grid as slabs come: their axis first, the other two in order
        self._plane_size = grid[1] * grid[2]
        self._index_dtype = np.int32 if int(np.prod(masks.shape[1:])) < 2**31 else np.int64
        self._next_z = 0
        # The previous slab's last plane [K, Y, X]: probabilities, kept flags, inside flags.
        self._last: tuple[torch.Tensor, np.ndarray, np.ndarray] | None = None

    def add(self, z0: int, slab: torch.Tensor, inside: torch.Tensor | None = None) -> None:
        """Take slab [K, dz, Y, X] at slice ``z0``; ``inside`` is ``slab > cut`` where the caller has it."""
        if z0 != self._next_z:
            raise ValueError(f"slab starts at z = {z0}, expected {self._next_z}: slabs must come in order")
        classes, depth = slab.shape[0], slab.shape[1]
        inside = (slab > self.cut if inside is None else inside).cpu().numpy()  # a view on a CPU
        # A class with no inside voxel in this slab nor in the previous slab's last plane has no boundary
        # here: one test over all classes spares the per-class work (most of 32 prompts, most slabs).
        active = inside.reshape(classes, -1).any(1)
        if self._last is not None:
            active |= self._last[2].reshape(classes, -1).any(1)
        last_kept = np.zeros((classes, *slab.shape[2:]), dtype=bool)
        plane = self._plane_size
        for k in np.flatnonzero(active).tolist():
            if not self.masks.has_levels(k):  # past the budget: its mask alone is kept, nothing to look for
                continue
            values, start, mask = slab[k], z0, inside[k]
            if self._last is not None:
                values, start = torch.cat([self._last[0][k : k + 1], values]), z0 - 1
                mask = np.concatenate([self._last[2][k : k + 1], mask])
            flat = boundary_index(mask)
            if self._last is not None and flat.size:  # the previous slab's last plane: only what it lacked
                flat = flat[(flat >= plane) | ~self._last[1][k].reshape(-1)[np.minimum(flat, plane - 1)]]
            if flat.size:
                levels = to_levels(values.reshape(-1)[torch.from_numpy(flat).to(values.device)], self.cut)
                index = flat.astype(self._index_dtype) + self._index_dtype(start * plane)
                if self.axis:  # frame indices to the grid's: swap the first coordinate with the axis's
                    coords = list(np.unravel_index(index, self._frame))
                    coords[0], coords[self.axis] = coords[self.axis], coords[0]
                    index = np.ravel_multi_index(coords, self.masks.shape[1:]).astype(self._index_dtype)
                self.masks.add_levels(k, index, levels.cpu().numpy())
                tail = flat[flat >= (values.shape[0] - 1) * plane] - (values.shape[0] - 1) * plane
                last_kept[k].reshape(-1)[tail] = True
        self._last = (slab[:, -1].clone(), last_kept, inside[:, -1].copy())  # copies: the slab is let go
        self._next_z = z0 + depth
