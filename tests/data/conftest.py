"""Fixtures of the data-layer tests: a tiny config, small generated demo datasets, hand-made MSD folders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import SimpleITK as sitk
from data_helpers import TINY, make_volume


@pytest.fixture
def tiny_config() -> dict[str, Any]:
    return json.loads(json.dumps(TINY))


@pytest.fixture(scope="session")
def demo_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three demo datasets generated once (2 cases per center, 10 head-and-neck patients)."""
    from duplus.data.download import run_download

    raw = tmp_path_factory.mktemp("raw")
    for name in ("demo_abdomen_ct", "demo_abdomen_mri", "demo_headneck_pet"):
        run_download(name, TINY, raw / name / "download.json")
    return raw


@pytest.fixture
def msd_folder(tmp_path: Path) -> Callable[..., Path]:
    """Factory: an MSD folder of ``n`` small cases (imagesTr, labelsTr, dataset.json with centers)."""

    def build(n: int = 4, name: str = "user_msd", with_json: bool = True) -> Path:
        root = tmp_path / name
        (root / "imagesTr").mkdir(parents=True)
        (root / "labelsTr").mkdir()
        training = []
        for index in range(n):
            image, label = make_volume(seed=index)
            case = f"case{index:02d}"
            sitk.WriteImage(image, str(root / "imagesTr" / f"{case}.nii.gz"))
            sitk.WriteImage(label, str(root / "labelsTr" / f"{case}.nii.gz"))
            training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz",
                             "center": "north" if index % 2 == 0 else "south"})
        if with_json:
            (root / "dataset.json").write_text(json.dumps({"name": name, "labels": {"0": "background", "1": "liver",
                                                                                      "2": "liver tumour"},
                                                          "training": training}))
        return root

    return build
