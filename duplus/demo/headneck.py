"""Synthetic head-and-neck FDG PET (SUV): neck and head outline, brain, salivary glands, primary tumour, nodes.

Tumour volumes come from the patient's record, so the burden visible in the image drives the synthetic hazard.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from duplus.demo.cohort import Patient
from duplus.demo.phantoms import Grid, blob, blur, ellipse_cylinder

AIR, BODY, BRAIN, PAROTID, TONSIL, SPINE, AIRWAY, PRIMARY, NODE = range(9)
HEADNECK_FOV = (192.0, 192.0, 192.0)
PET_SCANNERS = {
    "siteA": {"spacing": (4.0, 4.0, 4.0), "orientation": "LPS", "blur_mm": 2.5, "noise": 0.12, "calibration": 1.0},
    "siteB": {"spacing": (3.5, 3.5, 5.0), "orientation": "RAS", "blur_mm": 4.5, "noise": 0.25, "calibration": 0.85},
}
# SUV per tissue; tumour and node uptake are drawn per patient. siteB has a later uptake time:
# brighter background and glands, dimmer brain.
PET_SUV = {
    "siteA": {AIR: 0.0, BODY: 0.9, BRAIN: 7.0, PAROTID: 1.8, TONSIL: 2.4, SPINE: 1.3, AIRWAY: 0.05},
    "siteB": {AIR: 0.0, BODY: 1.2, BRAIN: 5.0, PAROTID: 2.4, TONSIL: 3.2, SPINE: 1.1, AIRWAY: 0.1},
}


def _radius_mm(volume_ml: float) -> float:
    return float((3.0 * volume_ml * 1000.0 / (4.0 * np.pi)) ** (1.0 / 3.0))


def headneck_anatomy(grid: Grid, rng: np.random.Generator, patient: Patient) -> tuple[np.ndarray, np.ndarray]:
    """Tissue-code map and label map (1 primary tumour, 2 lymph node) of one patient."""
    points = grid.points()
    x, y, z = points
    scale = rng.uniform(0.92, 1.08)
    tissue = np.full(x.shape, AIR, dtype=np.uint8)
    neck = ellipse_cylinder(points, (0.0, 5.0), (62.0 * scale, 58.0 * scale)) & (z < 40.0)
    head = blob(points, np.array([0.0, 10.0, 70.0]), np.array([74.0, 92.0, 80.0]) * scale, rng, wobble=0.03)
    tissue[neck | head] = BODY
    tissue[blob(points, np.array([0.0, 12.0, 88.0]), np.array([62.0, 78.0, 45.0]) * scale, rng, 0.03)] = BRAIN
    for side in (-1.0, 1.0):
        tissue[blob(points, np.array([side * 45.0 * scale, 5.0, 35.0]), np.array([12.0, 16.0, 20.0]), rng)] = PAROTID
        tissue[blob(points, np.array([side * 12.0, -14.0, 12.0]), np.array([7.0, 7.0, 10.0]), rng)] = TONSIL
    body = tissue != AIR
    tissue[ellipse_cylinder(points, (0.0, 32.0 * scale), (11.0, 10.0)) & body & (z < 45.0)] = SPINE
    tissue[ellipse_cylinder(points, (0.0, -10.0 * scale), (7.0, 8.0)) & body & (z < 20.0)] = AIRWAY
    label = np.zeros_like(tissue)
    radius = _radius_mm(patient.primary_ml)
    center = np.array([rng.normal(0.0, 6.0), -18.0 * scale + rng.normal(0.0, 4.0), rng.uniform(-10.0, 15.0)])
    primary = blob(points, center, radius * rng.uniform(0.85, 1.15, 3), rng, wobble=0.1) & body
    tissue[primary] = PRIMARY
    label[primary] = 1
    for number, volume in enumerate(patient.node_ml):
        side = 1.0 if (number % 2 == 0) == (rng.random() < 0.5) else -1.0
        node_center = np.array([side * rng.uniform(30.0, 42.0) * scale, rng.uniform(-12.0, 5.0),
                                rng.uniform(-35.0, 20.0)])
        node = blob(points, node_center, _radius_mm(volume) * rng.uniform(0.85, 1.15, 3), rng) & body & (label == 0)
        tissue[node] = NODE
        label[node] = 2
    return tissue, label


def render_pet(tissue: np.ndarray, grid: Grid, center: str, rng: np.random.Generator) -> sitk.Image:
    """PET in SUV (float32): per-patient lesion uptake, scanner resolution, signal-dependent noise."""
    scanner = PET_SCANNERS[center]
    lookup = np.zeros(NODE + 1, dtype=np.float32)
    for code, value in PET_SUV[center].items():
        lookup[code] = value * (rng.uniform(0.9, 1.1) if code != AIR else 1.0)
    lookup[PRIMARY] = rng.uniform(6.0, 16.0)
    lookup[NODE] = rng.uniform(3.0, 9.0)
    volume = lookup[tissue]
    primary = tissue == PRIMARY
    if primary.any():
        # Large tumours have a necrotic, less avid core.
        box = ndimage.find_objects(primary.astype(np.uint8))[0]
        inside = np.pad(primary[box], 1)
        depth = ndimage.distance_transform_edt(inside, sampling=grid.spacing[::-1])[1:-1, 1:-1, 1:-1]
        core = np.zeros_like(primary)
        core[box] = primary[box] & (depth > 12.0)
        volume[core] *= np.float32(0.5)
    volume = blur(volume, scanner["blur_mm"], grid.spacing) * np.float32(scanner["calibration"])
    sigma = scanner["noise"] * np.sqrt(np.maximum(volume, 0.0)) + 0.02
    volume = np.maximum(volume + rng.standard_normal(volume.shape, dtype=np.float32) * sigma, 0.0).astype(np.float32)
    return grid.to_image(volume, sitk.sitkFloat32)
