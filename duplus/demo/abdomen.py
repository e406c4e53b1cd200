"""Synthetic abdominal CT and T2 MRI phantoms: body, spine, vessels, liver (with tumours), kidneys, spleen.

Two scanners per modality differ in organ contrast, noise, blur, bias field, spacing and orientation.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from duplus.demo.phantoms import Grid, bias_field, blob, blur, ellipse_cylinder, random_point_inside, smooth_field

# Tissue codes of the anatomy map (not label ids).
AIR, FAT, MUSCLE, BOWEL, BONE, CANAL, BLOOD, LIVER, RKIDNEY, LKIDNEY, SPLEEN, TUMOR = range(12)
# Label ids written to labelsTr (see the catalog): 1 liver, 2 right kidney, 3 left kidney, 4 spleen, 5 liver tumor.
LABEL_OF_TISSUE = {LIVER: 1, RKIDNEY: 2, LKIDNEY: 3, SPLEEN: 4, TUMOR: 5}

# Field of view (mm, x y z) and each scanner's grid: spacing and the orientation it writes.
ABDOMEN_FOV = (300.0, 240.0, 150.0)
CT_SCANNERS = {
    "siteA": {"spacing": (3.0, 3.0, 3.0), "orientation": "LPS", "noise": 8.0, "blur_mm": 1.0},
    "siteB": {"spacing": (2.5, 2.5, 4.0), "orientation": "RAS", "noise": 22.0, "blur_mm": 2.2},
}
MRI_SCANNERS = {
    "siteA": {"spacing": (2.8, 2.8, 3.5), "orientation": "LPS", "noise": 6.0, "blur_mm": 1.0, "bias": 0.05},
    "siteB": {"spacing": (3.2, 3.2, 2.5), "orientation": "LPI", "noise": 12.0, "blur_mm": 1.6, "bias": 0.15},
}
# Mean intensity per tissue. siteA CT is unenhanced (hypodense tumour, liver brighter than spleen);
# siteB CT is contrast-enhanced (kidneys and spleen enhance more than liver, hyperdense tumour).
CT_HU = {
    "siteA": {AIR: -1000, FAT: -100, MUSCLE: 45, BOWEL: 25, BONE: 480, CANAL: 15, BLOOD: 40, LIVER: 60,
              RKIDNEY: 32, LKIDNEY: 32, SPLEEN: 47, TUMOR: 28},
    "siteB": {AIR: -1000, FAT: -95, MUSCLE: 60, BOWEL: 40, BONE: 520, CANAL: 20, BLOOD: 190, LIVER: 100,
              RKIDNEY: 190, LKIDNEY: 190, SPLEEN: 130, TUMOR: 150},
}
# T2 signal: siteA plain T2 (bright fat, liver darker than spleen); siteB fat-saturated T2 with a different
# coil and sequence (liver brighter than spleen), so organ contrast itself differs between the scanners.
MRI_SIGNAL = {
    "siteA": {AIR: 0, FAT: 300, MUSCLE: 90, BOWEL: 140, BONE: 150, CANAL: 400, BLOOD: 30, LIVER: 80,
              RKIDNEY: 210, LKIDNEY: 210, SPLEEN: 170, TUMOR: 80},
    "siteB": {AIR: 0, FAT: 110, MUSCLE: 70, BOWEL: 100, BONE: 100, CANAL: 450, BLOOD: 40, LIVER: 160,
              RKIDNEY: 300, LKIDNEY: 300, SPLEEN: 115, TUMOR: 160},
}


def abdomen_anatomy(grid: Grid, rng: np.random.Generator, tumors: bool) -> tuple[np.ndarray, np.ndarray]:
    """Tissue-code map and label map (both (z, y, x) uint8) of one randomly jittered abdomen."""
    points = grid.points()
    scale = rng.uniform(0.9, 1.08)
    semi = (138.0 * scale, 100.0 * scale * rng.uniform(0.95, 1.05))
    fat_mm = rng.uniform(10.0, 22.0)
    tissue = np.full(points[0].shape, AIR, dtype=np.uint8)
    tissue[ellipse_cylinder(points, (0.0, 5.0), semi)] = FAT
    inner_semi = (semi[0] - fat_mm, semi[1] - fat_mm)
    tissue[ellipse_cylinder(points, (0.0, 5.0), inner_semi)] = MUSCLE
    inside = ellipse_cylinder(points, (0.0, 5.0), (inner_semi[0] - 9.0, inner_semi[1] - 9.0))
    tissue[inside] = BOWEL
    # Visceral fat: smooth random pockets between the bowel loops.
    pockets = smooth_field(tissue.shape, rng, 3.0, 1.0) > 0.9
    tissue[inside & pockets] = FAT

    def jitter(center: tuple[float, float, float], spread: float = 6.0) -> np.ndarray:
        return np.array(center) * np.array([scale, scale, 1.0]) + rng.normal(0.0, spread, 3)

    def size(semi_axes: tuple[float, float, float]) -> np.ndarray:
        return np.array(semi_axes) * rng.uniform(0.87, 1.13, 3) * np.array([scale, scale, 1.0])

    organs = [
        (LIVER, blob(points, jitter((-55.0, -5.0, 25.0)), size((70.0, 58.0, 62.0)), rng)),
        (SPLEEN, blob(points, jitter((80.0, 35.0, 30.0)), size((28.0, 22.0, 42.0)), rng)),
        (RKIDNEY, blob(points, jitter((-52.0, 52.0, -28.0)), size((26.0, 20.0, 46.0)), rng)),
        (LKIDNEY, blob(points, jitter((55.0, 52.0, -15.0)), size((26.0, 20.0, 46.0)), rng)),
    ]
    for code, mask in organs:
        tissue[mask & inside] = code
    # Spine, spinal canal and the great vessels sit in front of / inside everything else.
    tissue[ellipse_cylinder(points, (0.0, 66.0 * scale), (19.0, 17.0))] = BONE
    tissue[ellipse_cylinder(points, (0.0, 74.0 * scale), (6.0, 6.0))] = CANAL
    tissue[ellipse_cylinder(points, (12.0, 44.0 * scale), (11.0, 11.0))] = BLOOD
    tissue[ellipse_cylinder(points, (-20.0, 42.0 * scale), (10.0, 12.0))] = BLOOD
    if tumors:
        liver = tissue == LIVER
        for _ in range(int(rng.integers(1, 3))):
            radius = rng.uniform(8.0, 18.0)
            margin = int(np.ceil(radius / max(grid.spacing)))
            center = random_point_inside(liver, points, rng, margin_vox=margin)
            if center is None:
                continue
            lesion = blob(points, center, radius * rng.uniform(0.8, 1.2, 3), rng, wobble=0.12)
            tissue[lesion & liver] = TUMOR
    label = np.zeros_like(tissue)
    for code, label_id in LABEL_OF_TISSUE.items():
        label[tissue == code] = label_id
    return tissue, label


def _paint(tissue: np.ndarray, means: dict[int, float], rng: np.random.Generator, jitter: float) -> np.ndarray:
    """Tissue means (with a per-case jitter, e.g. contrast timing) painted into a float volume."""
    lookup = np.zeros(max(means) + 1, dtype=np.float32)
    for code, value in means.items():
        lookup[code] = value + (rng.normal(0.0, jitter) if code != AIR else 0.0)
    return lookup[tissue]


def render_ct(tissue: np.ndarray, grid: Grid, center: str, rng: np.random.Generator) -> sitk.Image:
    """CT in HU (int16) as scanner ``center`` would acquire it."""
    scanner = CT_SCANNERS[center]
    volume = _paint(tissue, CT_HU[center], rng, jitter=4.0)
    body = tissue != AIR
    volume += smooth_field(volume.shape, rng, 2.0, 5.0) * body
    volume = blur(volume, scanner["blur_mm"], grid.spacing)
    volume += rng.standard_normal(volume.shape, dtype=np.float32) * np.float32(scanner["noise"])
    volume = np.clip(np.round(volume), -1024, 3071).astype(np.int16)
    return grid.to_image(volume, sitk.sitkInt16)


def render_mri(tissue: np.ndarray, grid: Grid, center: str, rng: np.random.Generator) -> sitk.Image:
    """T2 magnitude image (int16) with a smooth bias field and Rician noise."""
    scanner = MRI_SCANNERS[center]
    volume = _paint(tissue, MRI_SIGNAL[center], rng, jitter=8.0)
    body = tissue != AIR
    volume += smooth_field(volume.shape, rng, 2.0, 8.0) * body
    volume = blur(volume, scanner["blur_mm"], grid.spacing)
    volume *= bias_field(grid.points(), rng, scanner["bias"]) * np.float32(rng.uniform(0.7, 1.4))
    sigma = scanner["noise"]
    real = volume + rng.standard_normal(volume.shape, dtype=np.float32) * np.float32(sigma)
    imaginary = rng.standard_normal(volume.shape, dtype=np.float32) * np.float32(sigma)
    magnitude = np.sqrt(real**2 + imaginary**2)  # magnitude images have Rician noise, never negative
    return grid.to_image(np.clip(np.round(magnitude), 0, 32767).astype(np.int16), sitk.sitkInt16)
