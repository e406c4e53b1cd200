"""From the values of a user's label files to the label ids the store keeps.

A dataset's ``labels`` name the values of its label files that are classes; every other value
is background (an atlas of a hundred regions, of which a run wants two). The store keeps labels
as uint8, so values above 255 are renumbered 1..N in value order; values that fit are kept as
they are, so a label store, its manifest and evaluation against the original files stay the
values the user wrote.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from duplus.errors import DataError

STORED_MAX = 255  # the store's uint8 labels
# More distinct values than any label map holds (FreeSurfer's aparc+aseg has about 110, the
# largest atlases a few hundred): a file with more is an intensity image given as the label.
MAX_LABEL_VALUES = 1000


@dataclass(frozen=True)
class LabelValues:
    """How one dataset's label values become stored ids: ``stored`` maps each declared value to its id."""

    stored: dict[int, int]
    classes: dict[int, str] = field(default_factory=dict)  # stored id -> class name

    @property
    def renumbered(self) -> bool:
        """Whether stored ids differ from the file's values (then the store keeps a renumbered original)."""
        return any(value != stored for value, stored in self.stored.items())

    def apply(self, label: np.ndarray) -> tuple[np.ndarray, dict[int, int]]:
        """(uint8 label of stored ids, {undeclared value: voxel count}), undeclared values set to 0.

        ``label`` is returned as it is (no copy) when it holds only declared values that need no
        renumbering, so a dataset whose files match its config is stored byte for byte as before.
        """
        values, counts = np.unique(label, return_counts=True)
        if len(values) and values[0] < 0:  # the integrity check refuses such labels first
            raise DataError(f"label holds negative values (e.g. {values[0]}), which are no label ids")
        undeclared = {int(v): int(n) for v, n in zip(values, counts) if v != 0 and int(v) not in self.stored}
        if not undeclared and not self.renumbered:
            return label, {}
        lookup = np.zeros(int(values.max()) + 1 if len(values) else 1, dtype=np.uint8)
        for value, stored in self.stored.items():
            if value < len(lookup):
                lookup[value] = stored
        return lookup[label.astype(np.int64, copy=False)], undeclared


def label_values(labels: Mapping[int, str]) -> LabelValues:
    """The stored id of every declared value: itself when all fit in uint8, else 1..N in value order."""
    values = sorted(int(v) for v in labels if int(v) != 0)
    if not values or values[-1] <= STORED_MAX:
        stored = {v: v for v in values}
    else:
        if len(values) > STORED_MAX:  # refused when the config is read (duplus.data.registry)
            raise DataError(f"labels: {len(values)} label values are named; the store holds at most {STORED_MAX}")
        stored = {v: number for number, v in enumerate(values, start=1)}
    return LabelValues(stored, {stored[v]: labels[v] for v in values})


def summarize_undeclared(counts: Mapping[int, int], limit: int = 10) -> str:
    """``3 values (12: 400 voxels, 40: 7 voxels, ...)``: what a dataset's declared labels left as background."""
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    shown = ", ".join(f"{value}: {voxels} voxels" for value, voxels in ordered[:limit])
    more = ", ..." if len(ordered) > limit else ""
    return f"{len(ordered)} value(s) ({shown}{more})"
