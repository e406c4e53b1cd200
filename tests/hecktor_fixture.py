"""A generated miniature of HECKTOR 2022's training release: PET/CT pairs on different grids.

As in the real release, ``imagesTr/<case>__CT.nii.gz`` (about 1 mm in-plane) and
``imagesTr/<case>__PT.nii.gz`` (about 4 mm) of one patient lie on grids with different spacings,
sizes and origins (their voxel centres never coincide), and ``labelsTr/<case>.nii.gz`` is drawn on
the CT grid. Case ids carry the center prefix (``CHUM-001``). One anatomy per patient, defined in
millimetres (the demo's head-and-neck phantom), is sampled on both grids, so CT, PET and label agree
in patient space.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from duplus.demo.cohort import draw_patient
from duplus.demo.headneck import (
    AIR,
    AIRWAY,
    BODY,
    BRAIN,
    NODE,
    PAROTID,
    PRIMARY,
    SPINE,
    TONSIL,
    headneck_anatomy,
    render_pet,
)
from duplus.demo.phantoms import Grid

CASES = ("CHUM-001", "CHUM-002", "CHUP-001", "CHUP-002")
# CT: 0.98 x 0.98 x 1.5 mm over the neck; PET: 4 mm over a wider field, in another orientation at CHUP.
CT_SPACING, CT_SIZE = (0.98, 0.98, 1.5), (140, 140, 72)
PET_SPACING, PET_SIZE = (4.0, 4.0, 4.0), (44, 44, 36)
CT_SHIFT, PET_SHIFT = (0.31, -0.47, 0.52), (-1.37, 0.93, -2.11)  # mm: no voxel centre in common
HOUNSFIELD = {AIR: -1000.0, BODY: 40.0, BRAIN: 35.0, PAROTID: -10.0, TONSIL: 60.0, SPINE: 700.0, AIRWAY: -950.0,
              PRIMARY: 55.0, NODE: 45.0}


@dataclass(frozen=True)
class ShiftedGrid(Grid):
    """A demo grid moved by ``shift`` mm: scanners do not centre their grids on the same point."""

    shift: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def origin(self) -> np.ndarray:
        return super().origin + np.asarray(self.shift)


def ct_grid(case_id: str) -> ShiftedGrid:
    return ShiftedGrid(CT_SIZE, CT_SPACING, "LPS", CT_SHIFT)


def pet_grid(case_id: str) -> ShiftedGrid:
    return ShiftedGrid(PET_SIZE, PET_SPACING, "RAS" if case_id.startswith("CHUP") else "LPS", PET_SHIFT)


def _render_ct(tissue: np.ndarray, grid: Grid, rng: np.random.Generator) -> sitk.Image:
    lookup = np.zeros(NODE + 1, dtype=np.float32)
    for code, value in HOUNSFIELD.items():
        lookup[code] = value
    volume = lookup[tissue] + rng.normal(0.0, 12.0, tissue.shape).astype(np.float32)
    return grid.to_image(np.round(volume), sitk.sitkInt16)


def write_hecktor(root: Path, cases: tuple[str, ...] = CASES, seed: int = 0) -> Path:
    """Write the miniature release into ``root`` (imagesTr/, labelsTr/); returns ``root``."""
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    for number, case_id in enumerate(cases):
        patient = draw_patient(case_id, "siteA", np.random.default_rng([seed, number, 1]))
        grids = {"CT": ct_grid(case_id), "PT": pet_grid(case_id)}
        # The same anatomy stream on both grids: shapes are drawn in mm, whatever the sampling.
        drawn = {scan: headneck_anatomy(grid, np.random.default_rng([seed, number, 2]), patient)
                 for scan, grid in grids.items()}
        ct_tissue, ct_label = drawn["CT"]
        pet_tissue, _ = drawn["PT"]
        sitk.WriteImage(_render_ct(ct_tissue, grids["CT"], np.random.default_rng([seed, number, 3])),
                        str(root / "imagesTr" / f"{case_id}__CT.nii.gz"))
        sitk.WriteImage(render_pet(pet_tissue, grids["PT"], "siteA", np.random.default_rng([seed, number, 4])),
                        str(root / "imagesTr" / f"{case_id}__PT.nii.gz"))
        sitk.WriteImage(grids["CT"].to_image(ct_label, sitk.sitkUInt8), str(root / "labelsTr" / f"{case_id}.nii.gz"))
    return root
