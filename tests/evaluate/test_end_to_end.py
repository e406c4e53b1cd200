"""Evaluation through the real preprocessing, restore, taxonomy and prompt templates of the project.

An oracle model thresholds the preprocessed intensities; if any geometry step (reorientation,
resampling, crop) were mapped back wrongly, its Dice in original space would collapse.
"""

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from duplus.data.manifest import case_of
from duplus.data.preprocess import settings, transform_case
from duplus.evaluate.evaluate_stage import evaluate_cases
from duplus.prompts.templates import context_prompt, target_prompts

TEXT_DIM = 4
HU = {"background": -100.0, "liver": 100.0, "liver tumor": 300.0}


class TemplateCache:
    """Real prompt texts; the embedding says which class (0 liver, 1 tumour) the head should find."""

    dim = TEXT_DIM

    def __init__(self):
        self.vectors = {context_prompt("CT", "abdomen"): torch.zeros(TEXT_DIM)}
        for code, name in enumerate(["liver", "liver tumor"]):
            self.vectors[target_prompts("CT", name)[0]] = torch.tensor([0.0, float(code), 0.0, 0.0])

    def get(self, text):
        return self.vectors[text]

    def get_many(self, texts):
        return torch.stack([self.get(t) for t in texts])


class IntensityOracle(torch.nn.Module):
    def __init__(self, cuts):
        super().__init__()
        self.cuts = torch.tensor(cuts)
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, image, modality, context, targets):
        cut = self.cuts[targets[:, 1].long()].reshape(1, -1, 1, 1, 1)
        return 50.0 * (image - cut)


def _oracle_case(tmp_path):
    label = np.zeros((12, 20, 24), np.uint8)  # Z, Y, X; off-centre so that a flip would be caught
    label[2:9, 4:14, 3:15] = 1
    label[4:7, 6:10, 5:9] = 2
    image = np.full(label.shape, HU["background"], np.float32)
    image[label == 1], image[label == 2] = HU["liver"], HU["liver tumor"]
    raw_image = sitk.GetImageFromArray(image)
    raw_label = sitk.GetImageFromArray(label)
    for item in (raw_image, raw_label):
        item.SetSpacing((1.6, 1.2, 3.0))
        item.SetOrigin((4.0, -7.0, 2.0))
        item.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(raw_image, str(tmp_path / "image.nii.gz"))
    sitk.WriteImage(raw_label, str(tmp_path / "label.nii.gz"))

    config = {"preprocess": {"spacing": [1.6, 1.2, 3.0], "crop_foreground": True},
              "pretrain": {"patch_size": [16, 16, 16]},
              "inference": {"overlap": 0.25, "sw_batch_size": 2, "blend": "gaussian", "threshold": 0.5},
              "evaluate": {"nsd_tolerance_mm": 2.0}}
    array, small_label, meta = transform_case(raw_image, raw_label, "CT", settings(config), crop=True)
    (tmp_path / "c1").mkdir()
    np.save(tmp_path / "c1" / "image.npy", array)
    (tmp_path / "c1" / "meta.json").write_text(json.dumps(meta))
    # Intensity cuts halfway between the normalised tissue values.
    levels = [float(np.median(array[small_label == v])) for v in (0, 1, 2)]
    cuts = [(levels[0] + levels[1]) / 2, (levels[1] + levels[2]) / 2]

    cases = [case_of(dict(dataset="demo", case="c1", center="siteB", modality="CT", sequence=None, region="abdomen",
                          split="test", image="c1/image.npy", meta="c1/meta.json", shape="x".join(map(str, array.shape)),
                          labels=json.dumps({"1": "liver", "2": "liver tumor"}),
                          raw_image=str(tmp_path / "image.nii.gz"), raw_label=str(tmp_path / "label.nii.gz")), tmp_path)]
    return IntensityOracle(cuts), cases, config


def test_oracle_is_perfect_after_restoring_to_the_original_grid(tmp_path):
    oracle, cases, config = _oracle_case(tmp_path)
    per_case = evaluate_cases(oracle, cases, TemplateCache(), config)
    assert per_case["class"].tolist() == ["liver", "liver tumor"]
    assert per_case["dice"].min() > 0.99, per_case
    assert per_case["hd95"].max() < 1e-6 and per_case["center"].tolist() == ["siteB", "siteB"]


@pytest.mark.parametrize("axis,mm", [(0, 3.0), (1, 1.2), (2, 1.6)])
def test_hd95_is_measured_in_mm_of_the_original_grid_along_each_array_axis(tmp_path, monkeypatch, axis, mm):
    """A prediction one original voxel off along array axis Z, Y or X scores that voxel's size in mm
    (spacing 1.6 x 1.2 x 3.0 mm as x, y, z): the spacing reaches the metric in array order."""
    import duplus.evaluate.case_scores as cases_module

    restore = cases_module.restore_mask
    monkeypatch.setattr(cases_module, "restore_mask", lambda *args: np.roll(restore(*args), 1, axis=axis))
    oracle, cases, config = _oracle_case(tmp_path)
    per_case = evaluate_cases(oracle, cases, TemplateCache(), config)
    assert per_case["hd95"].tolist() == pytest.approx([mm, mm])
