"""K boolean masks kept bit-packed (8 voxels per byte) until one class at a time is needed.

32 prompts on a 300 x 512 x 512 grid are 2.5 GB as bool arrays and 315 MB packed; the masks are
restored to the original grid and written one class at a time anyway. Beside them, the probability
levels of the voxels along each mask's boundary (``duplus.inference.boundary``) let that restoration
interpolate probabilities instead of copying voxels.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

LEVELS = 255  # boundary probabilities are kept as uint8 levels p x 255


class PackedMasks:
    """A [K, Z, Y, X] boolean stack stored with ``np.packbits`` along x; ``masks[k]`` unpacks one class.

    Args:
        classes, shape: K and the grid (Z, Y, X).
        cut: the probability threshold the masks were made with (a voxel is inside above it).
        level_budget_bytes: memory for boundary levels; a class that would exceed it keeps its mask only.
    """

    def __init__(self, classes: int, shape: tuple[int, int, int], cut: float = 0.5,
                 level_budget_bytes: int = 0) -> None:
        self.shape = (int(classes), *(int(s) for s in shape))
        self.cut = float(cut)
        self.level_budget_bytes = int(level_budget_bytes)
        self._bits = np.zeros((*self.shape[:3], (self.shape[3] + 7) // 8), dtype=np.uint8)
        self._levels: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(self.shape[0])]
        self._level_bytes = 0
        self.mask_only: set[int] = set() if self.level_budget_bytes > 0 else set(range(self.shape[0]))

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return self._bits.nbytes + self._level_bytes

    @property
    def level_cut(self) -> float:
        """The threshold on interpolated levels that matches ``cut`` (levels are integers on either side)."""
        return math.floor(self.cut * LEVELS) + 0.5

    def write(self, start: int, masks: np.ndarray, axis: int = 0) -> None:
        """Store bool masks [K, d, Y, X] at slices ``start : start + d`` (``axis`` 1: [K, d, Z, X] at rows of y)."""
        if axis not in (0, 1):
            raise ValueError(f"slabs run along z (0) or y (1), not axis {axis}: masks are packed along x")
        other = self.shape[2 - axis]
        if masks.shape[0] != self.shape[0] or masks.shape[2:] != (other, self.shape[3]):
            raise ValueError(f"slab of shape {masks.shape} along axis {axis} does not fit masks of shape {self.shape}")
        packed = np.packbits(masks, axis=-1)
        if axis == 0:
            self._bits[:, start : start + masks.shape[1]] = packed
        else:
            self._bits[:, :, start : start + masks.shape[1]] = packed.swapaxes(1, 2)

    def add_levels(self, k: int, flat_index: np.ndarray, levels: np.ndarray) -> None:
        """Keep class ``k``'s boundary levels at ``flat_index`` (into [Z, Y, X]); dropped past the budget."""
        if k in self.mask_only:
            return
        size = flat_index.nbytes + levels.nbytes
        if self._level_bytes + size > self.level_budget_bytes:
            self._level_bytes -= sum(i.nbytes + v.nbytes for i, v in self._levels[k])
            self._levels[k] = []
            self.mask_only.add(k)
            return
        self._levels[k].append((flat_index, levels))
        self._level_bytes += size

    def has_levels(self, k: int) -> bool:
        return k not in self.mask_only

    def levels(self, k: int) -> np.ndarray:
        """Class ``k`` as uint8 levels [Z, Y, X]: 255 inside, 0 outside, probability levels along its boundary."""
        if not self.has_levels(k):
            raise ValueError(f"class {k} kept its mask only (boundary levels off or past their memory budget)")
        out = self[k].astype(np.uint8) * np.uint8(LEVELS)
        flat = out.reshape(-1)
        for index, values in self._levels[k]:
            flat[index] = values
        return out

    def restored(self, k: int, meta: Mapping[str, Any]) -> Any:
        """Class ``k`` on the original grid (uint8 SimpleITK image): interpolated where levels were kept."""
        from duplus.data.restore import restore_levels, restore_to_original

        if self.has_levels(k):
            return restore_levels(self.levels(k), meta, self.level_cut)
        return restore_to_original(self[k].astype(np.uint8), meta, is_label=True)

    def __getitem__(self, k: int) -> np.ndarray:
        """Class ``k`` as a bool array [Z, Y, X]."""
        return np.unpackbits(self._bits[k], axis=-1, count=self.shape[3]).astype(bool)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        full = np.unpackbits(self._bits, axis=-1, count=self.shape[3]).astype(bool)
        return full if dtype is None else full.astype(dtype)
