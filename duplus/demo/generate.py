"""The embedded demo: deterministic synthetic CT, MRI and PET datasets from two scanners, in MSD layout.

Same seed and sizes give byte-identical files; the head-and-neck set adds clinical.csv with survival.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import SimpleITK as sitk

from duplus.atomic import write_csv, write_json
from duplus.data.builtin_datasets import DEMO_CENTERS
from duplus.data.image_io import write_image
from duplus.data.registry import DatasetSpec, builtin_datasets
from duplus.demo.abdomen import ABDOMEN_FOV, CT_SCANNERS, MRI_SCANNERS, abdomen_anatomy, render_ct, render_mri
from duplus.demo.cohort import CODEBOOK, Patient, clinical_table, draw_outcomes, draw_patient
from duplus.demo.headneck import HEADNECK_FOV, PET_SCANNERS, headneck_anatomy, render_pet
from duplus.demo.phantoms import Grid, fov_grid
from duplus.errors import ConfigError
from duplus.progress import progress
from duplus.settings import schema_default

log = logging.getLogger(__name__)

# A fixed stream number per dataset keeps each dataset's phantoms independent of the others.
STREAMS = {"demo_abdomen_ct": 11, "demo_abdomen_mri": 23, "demo_headneck_pet": 37}
CASE_PREFIX = {"demo_abdomen_ct": "abdct", "demo_abdomen_mri": "abdmr", "demo_headneck_pet": "hnpet"}
MSD_MODALITY = {"CT": "CT", "MRI": "MRI", "PET": "PET"}


def demo_sizes(config: Mapping[str, Any] | None) -> tuple[int, int, int]:
    """(seed, cases per center, head-and-neck patients) from ``config`` with the schema's defaults."""
    # Read as written, not through Settings.of: the schema's minimums (2 cases per center, 10 patients) are
    # the pipeline's, for usable results; the library generates smaller demos too (its tests do, in seconds).
    config = config or {}
    demo = config.get("demo") or {}
    per_center = int(demo.get("cases_per_center", schema_default("demo", "cases_per_center")))
    patients = int(demo.get("headneck_patients", schema_default("demo", "headneck_patients")))
    if per_center < 1:
        raise ConfigError(f"demo.cases_per_center: expected a positive number of cases, got {per_center}")
    if patients < len(DEMO_CENTERS):
        raise ConfigError(f"demo.headneck_patients: expected at least {len(DEMO_CENTERS)}, got {patients}")
    return int(config.get("seed", schema_default("seed"))), per_center, patients


def _rng(seed: int, name: str, *parts: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, STREAMS[name], *parts]))


def _case_plan(name: str, per_center: int, patients: int) -> list[tuple[str, int, int]]:
    """(case id, center index, case index within the center) of every case."""
    if name == "demo_headneck_pet":
        counts = [patients // len(DEMO_CENTERS) + (1 if k < patients % len(DEMO_CENTERS) else 0)
                  for k in range(len(DEMO_CENTERS))]
    else:
        counts = [per_center] * len(DEMO_CENTERS)
    prefix = CASE_PREFIX[name]
    return [(f"{prefix}_{DEMO_CENTERS[c]}_{i:03d}", c, i) for c, count in enumerate(counts) for i in range(count)]


def _grid(name: str, center: str) -> Grid:
    if name == "demo_abdomen_ct":
        scanner, fov = CT_SCANNERS[center], ABDOMEN_FOV
    elif name == "demo_abdomen_mri":
        scanner, fov = MRI_SCANNERS[center], ABDOMEN_FOV
    else:
        scanner, fov = PET_SCANNERS[center], HEADNECK_FOV
    return fov_grid(fov, scanner["spacing"], scanner["orientation"])


def _write_case(root: Path, case_id: str, image: sitk.Image, label: np.ndarray, grid: Grid) -> dict[str, str]:
    write_image(image, root / "imagesTr" / f"{case_id}.nii.gz")
    write_image(grid.to_image(label, sitk.sitkUInt8), root / "labelsTr" / f"{case_id}.nii.gz")
    return {"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"}


def _abdomen(name: str, spec: DatasetSpec, root: Path, seed: int, plan: list[tuple[str, int, int]]) -> list[dict]:
    render: Callable = render_ct if spec.modality == "CT" else render_mri
    entries = []
    for case_id, center_index, index in progress(plan, desc=f"generate {name}"):
        center = DEMO_CENTERS[center_index]
        rng = _rng(seed, name, center_index, index)
        grid = _grid(name, center)
        tissue, label = abdomen_anatomy(grid, rng, tumors=5 in spec.labels)
        entry = _write_case(root, case_id, render(tissue, grid, center, rng), label, grid)
        entries.append({**entry, "center": center})
    return entries


def _headneck(name: str, root: Path, seed: int, plan: list[tuple[str, int, int]]) -> list[dict]:
    patients: list[Patient] = []
    log_volumes = []
    entries = []
    for case_id, center_index, index in progress(plan, desc=f"generate {name}"):
        center = DEMO_CENTERS[center_index]
        patient = draw_patient(case_id, center, _rng(seed, name, center_index, index, 1))
        grid = _grid(name, center)
        rng = _rng(seed, name, center_index, index, 2)
        tissue, label = headneck_anatomy(grid, rng, patient)
        entry = _write_case(root, case_id, render_pet(tissue, grid, center, rng), label, grid)
        voxel_ml = float(np.prod(grid.spacing)) / 1000.0
        # The hazard uses the burden as drawn in the image, not the requested volume.
        log_volumes.append(np.log(max(np.count_nonzero(label) * voxel_ml, 0.05)))
        patients.append(patient)
        entries.append({**entry, "center": center})
    time, event = draw_outcomes(patients, np.array(log_volumes), _rng(seed, name, 999))
    frame = clinical_table(patients, time, event, _rng(seed, name, 998))
    write_csv(root / "clinical.csv", frame)
    return entries


def generate_demo(name: str, config: Mapping[str, Any] | None, root: str | Path) -> list[str]:
    """Write demo dataset ``name`` into ``root`` (MSD layout); returns the case ids.

    ``root`` should be empty or new: the caller (the download stage) generates into a temporary
    folder and renames it into place.
    """
    if name not in STREAMS:
        raise ConfigError(f"datasets.{name}: not a demo dataset (demo datasets: {', '.join(STREAMS)})")
    spec = builtin_datasets()[name]
    seed, per_center, patients = demo_sizes(config)
    root = Path(root)
    plan = _case_plan(name, per_center, patients)
    if name == "demo_headneck_pet":
        entries = _headneck(name, root, seed, plan)
    else:
        entries = _abdomen(name, spec, root, seed, plan)
    grids = {center: _grid(name, center) for center in DEMO_CENTERS}
    scanners = {center: {"spacing_mm": list(grid.spacing), "orientation": grid.orientation}
                for center, grid in grids.items()}
    index: dict[str, Any] = {
        "name": name, "description": spec.description, "reference": "synthetic phantoms generated by duplus",
        "licence": "CC0 (synthetic)", "tensorImageSize": "3D", "modality": {"0": MSD_MODALITY[spec.modality]},
        "sequence": spec.sequence, "region": spec.region,
        "labels": {"0": "background", **{str(k): v for k, v in spec.labels.items()}},
        "numTraining": len(entries), "numTest": 0, "training": entries, "test": [], "centers": scanners,
        "seed": seed,
    }
    if name == "demo_headneck_pet":
        index["clinical"] = "clinical.csv"
        index["clinical_codebook"] = CODEBOOK
    write_json(root / "dataset.json", index)
    log.info("generated %s: %d cases", name, len(entries))
    return [case_id for case_id, _, _ in plan]
