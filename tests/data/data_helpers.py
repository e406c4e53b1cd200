"""Helpers shared by the data-layer tests: the tiny config, small synthetic volumes, user-dataset configs."""

from __future__ import annotations

import json
import locale
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

TINY: dict[str, Any] = {
    "seed": 0,
    "demo": {"cases_per_center": 2, "headneck_patients": 10},
    "preprocess": {"spacing": [4.0, 4.0, 4.0], "ct_window": [-991, 500], "percentiles": [2, 98],
                   "crop_foreground": True, "test_fraction": 0.25},
    "datasets": {"demo_abdomen_ct": {}, "demo_abdomen_mri": {}, "demo_headneck_pet": {}},
}


def make_volume(shape_zyx: tuple[int, int, int] = (12, 16, 20), spacing: tuple[float, float, float] = (2.0, 2.0, 3.0),
                seed: int = 0, direction: tuple[float, ...] = (1, 0, 0, 0, 1, 0, 0, 0, 1)
                ) -> tuple[sitk.Image, sitk.Image]:
    """A small CT-like image (HU) with a body and a two-class label on the same grid."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape_zyx)
    center = np.array(shape_zyx) / 2.0
    body = ((y - center[1]) / (shape_zyx[1] * 0.45)) ** 2 + ((x - center[2]) / (shape_zyx[2] * 0.45)) ** 2 <= 1
    organ = ((z - center[0]) / 4.0) ** 2 + ((y - center[1]) / 4.0) ** 2 + ((x - center[2] + 3) / 4.0) ** 2 <= 1
    lesion = ((z - center[0]) / 1.6) ** 2 + ((y - center[1]) / 1.6) ** 2 + ((x - center[2] + 3) / 1.6) ** 2 <= 1
    image = np.full(shape_zyx, -1000.0, dtype=np.float32)
    image[body] = 40.0
    image[organ] = 90.0
    image[lesion] = 20.0
    image += rng.normal(0, 5, shape_zyx).astype(np.float32)
    label = np.zeros(shape_zyx, dtype=np.uint8)
    label[organ] = 1
    label[lesion] = 2
    result = []
    for array, pixel in ((image, sitk.sitkInt16), (label, sitk.sitkUInt8)):
        volume = sitk.Cast(sitk.GetImageFromArray(array), pixel)
        volume.SetSpacing(spacing)
        volume.SetOrigin((-10.0, 5.0, 30.0))
        volume.SetDirection(direction)
        result.append(volume)
    return result[0], result[1]


def user_config(root: Path, kind: str = "msd", name: str = "mydata") -> dict[str, Any]:
    config = json.loads(json.dumps(TINY))
    config["datasets"] = {name: {"kind": kind, "root": str(root), "modality": "CT", "region": "abdomen",
                                 "labels": {1: "liver", 2: "hepatic tumour"}}}
    # Without it the schema's default (prognosis of the demo's head-and-neck PET) asks for a dataset this run lacks.
    config["prognosis"] = {"enabled": False}
    return config


def write_dicom_series(image: sitk.Image, folder: Path, prefix: str = "IMG", uid_per_file: bool = False,
                       series: int = 77, modality: str = "MR") -> list[Path]:
    """Write a 3-D image as one DICOM file per slice (file names in slice order).

    ``uid_per_file``: every file gets its own SeriesInstanceUID, as some converters write them;
    ``series``: the last component of the SeriesInstanceUID (another number: another series).
    """
    # GDCM's writer switches the process locale to "C": afterwards default-encoded text I/O in the
    # same test session (read_text(), subprocess text=True) would be ASCII. Put it back when done.
    saved = locale.setlocale(locale.LC_ALL)
    try:
        return _write_dicom_slices(image, folder, prefix, uid_per_file, series, modality)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_dicom_slices(image: sitk.Image, folder: Path, prefix: str, uid_per_file: bool, series: int,
                        modality: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    files = []
    for k in range(image.GetSize()[2]):
        slice_ = sitk.Cast(image[:, :, k], sitk.sitkInt16)
        series_uid = f"1.2.826.0.1.3680043.2.1125.1.{series}" + (f".{k + 1}" if uid_per_file else "")
        tags = {"0008|0060": modality, "0020|000e": series_uid, "0020|0013": str(k + 1),
                "0028|0030": "\\".join(map(str, image.GetSpacing()[:2])), "0018|0050": str(image.GetSpacing()[2]),
                "0020|0032": "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k)))),
                "0020|0037": "\\".join(map(str, (direction[0], direction[3], direction[6], direction[1], direction[4],
                                                 direction[7])))}
        for key, value in tags.items():
            slice_.SetMetaData(key, value)
        path = folder / f"{prefix}-{k + 1:05d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(slice_)
        files.append(path)
    return files
