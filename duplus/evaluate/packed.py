"""K boolean masks kept bit-packed (8 voxels per byte) until one class at a time is needed.

32 prompts on a 300 x 512 x 512 grid are 2.5 GB as bool arrays and 315 MB packed; the masks are
restored to the original grid and written one class at a time anyway.
"""

from __future__ import annotations

import numpy as np


class PackedMasks:
    """A [K, Z, Y, X] boolean stack stored with ``np.packbits`` along x; ``masks[k]`` unpacks one class."""

    def __init__(self, classes: int, shape: tuple[int, int, int]) -> None:
        self.shape = (int(classes), *(int(s) for s in shape))
        self._bits = np.zeros((*self.shape[:3], (self.shape[3] + 7) // 8), dtype=np.uint8)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return self._bits.nbytes

    def write(self, z0: int, masks: np.ndarray) -> None:
        """Store bool masks [K, dz, Y, X] at slices ``z0 : z0 + dz``."""
        if masks.shape[0] != self.shape[0] or masks.shape[2:] != self.shape[2:]:
            raise ValueError(f"slab of shape {masks.shape} does not fit masks of shape {self.shape}")
        self._bits[:, z0 : z0 + masks.shape[1]] = np.packbits(masks, axis=-1)

    def __getitem__(self, k: int) -> np.ndarray:
        """Class ``k`` as a bool array [Z, Y, X]."""
        return np.unpackbits(self._bits[k], axis=-1, count=self.shape[3]).astype(bool)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        full = np.unpackbits(self._bits, axis=-1, count=self.shape[3]).astype(bool)
        return full if dtype is None else full.astype(dtype)
