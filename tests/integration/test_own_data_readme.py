"""The README's "Your own data" section, followed literally: its config (only the root changed) on a
generated brain-MRI folder with an atlas label, through `preprocess_all` and a short training."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[2]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
README_ROOT = "/data/my_brain_mri"

pytestmark = pytest.mark.integration


def readme_config() -> str:
    """The first YAML block of the README's own-data section, as printed."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### Your own data"):]
    return re.search(r"```yaml\n(.*?)```", section, re.S).group(1)


def atlas_folder(root: Path, cases: int = 4) -> Path:
    """MRI-like volumes whose labels hold an atlas: the three structures the README names (11, 17,
    53) among other regions, one numbered beyond 255."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    shape = (20, 24, 24)
    z, y, x = np.indices(shape)
    for index in range(cases):
        rng = np.random.default_rng(index)
        brain = ((z - 10) / 9) ** 2 + ((y - 12) / 11) ** 2 + ((x - 12) / 11) ** 2 <= 1
        atlas = np.where(brain, 2, 0).astype(np.uint16)          # cerebral white matter, not asked for
        atlas[brain & (z < 6)] = 1003                             # a cortical parcel, not asked for
        atlas[(abs(z - 10) <= 2) & (abs(y - 9) <= 2) & (abs(x - 7) <= 2)] = 17
        atlas[(abs(z - 10) <= 2) & (abs(y - 9) <= 2) & (abs(x - 17) <= 2)] = 53
        atlas[(abs(z - 13) <= 1) & (abs(y - 15) <= 2) & (abs(x - 9) <= 2)] = 11
        image = np.where(brain, 300.0, 5.0) + 200.0 * np.isin(atlas, (11, 17, 53)) + rng.normal(0, 10, shape)
        for array, folder in ((image.astype(np.float32), "imagesTr"), (atlas, "labelsTr")):
            volume = sitk.GetImageFromArray(array)
            volume.SetSpacing((4.0, 4.0, 4.0))
            sitk.WriteImage(volume, str(root / folder / f"sub{index}.nii.gz"))
    listing = [{"image": f"./imagesTr/sub{i}.nii.gz", "label": f"./labelsTr/sub{i}.nii.gz"} for i in range(cases)]
    (root / "dataset.json").write_text(json.dumps({"name": "my_brain_mri", "training": listing}))
    return root


def snakemake(workdir: Path, target: str, *configfiles: Path) -> subprocess.CompletedProcess:
    command = [SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "--directory", str(workdir), "--cores", "2", target,
               "--configfile", *map(str, configfiles)]
    env = dict(os.environ, DUPLUS_NO_PROGRESS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", errors="replace", env=env,
                            timeout=900)
    assert result.returncode == 0, f"snakemake {target} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def test_the_readme_config_preprocesses_and_trains_on_your_data_alone(tmp_path: Path) -> None:
    text = readme_config()
    assert README_ROOT in text
    data = atlas_folder(tmp_path / "my_brain_mri")
    mine = tmp_path / "mine.yaml"
    mine.write_text(text.replace(README_ROOT, str(data)), encoding="utf-8")
    work = tmp_path / "work"
    work.mkdir()
    snakemake(work, "preprocess_all", mine)
    manifest = pd.read_csv(work / "data" / "preprocessed" / "my_brain_mri" / "manifest.csv")
    assert list((work / "data" / "preprocessed").iterdir()) == [work / "data" / "preprocessed" / "my_brain_mri"]
    assert json.loads(manifest["labels"][0]) == {"11": "left caudate", "17": "left hippocampus",
                                                  "53": "right hippocampus"}
    log = (work / "logs" / "preprocess" / "my_brain_mri.log").read_text(encoding="utf-8")
    assert "label 2 value(s) (2: " in log and "1003: " in log and "taken as background" in log
    # A short training: the README's config with fewer, smaller steps.
    short = tmp_path / "short.yaml"
    short.write_text("pretrain: {steps: 4, patch_size: [16, 16, 16], checkpoint_every: 4, log_every: 2, "
                     "warmup_steps: 1}\n", encoding="utf-8")
    snakemake(work, "universal_pretrain", mine, short)
    results = work / "results"
    assert (results / "pretrain" / "model.safetensors").is_file()
    assert len(pd.read_csv(results / "pretrain" / "train_log.csv")) >= 2
    from duplus.prompts.cache import PromptCache

    texts = set(PromptCache.load(results / "prompts" / "minilm.safetensors").texts)
    assert "A T1-weighted Magnetic Resonance Imaging scan of a left caudate nucleus." in texts
    assert "A T1-weighted Magnetic Resonance Imaging scan of a left hippocampus." in texts
